/* A CUDA driver library (libcuda.so.1) that does nothing: for running Triton's own compiled launcher on a machine
 * without a GPU (ftsam_plugin.kernels.null_driver, launcher="triton"). It has every driver symbol Triton's
 * NVIDIA backend (driver.c) links against or looks up; each succeeds and hands back what a GPU would (an
 * sm_90-like device, handles that are never used, a CPU address taken as a device address). cuLaunchKernelEx
 * launches nothing: it counts the call and keeps its grid, stream, function and its first NOOP_ARGS argument
 * words (every SAM kernel has at least that many arguments; the list has no end marker), read through ctypes. Built by native_build with -shared -fPIC and the soname libcuda.so.1. */
#include <stdint.h>
#include <string.h>

typedef int CUresult; /* 0: CUDA_SUCCESS */

typedef struct {
  unsigned int gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, sharedMemBytes;
  void *hStream;
  void *attrs;
  unsigned int numAttrs;
} LaunchConfig; /* the layout of CUlaunchConfig */

#define NOOP_ARGS 5
long long noop_launches = 0;
unsigned int noop_last_grid[3];
unsigned int noop_last_block[3];
void *noop_last_stream = 0;
void *noop_last_function = 0;
uint64_t noop_last_args[NOOP_ARGS]; /* 8 bytes at each of the first kernel arguments */

CUresult cuLaunchKernelEx(const LaunchConfig *config, void *f, void **params, void **extra) {
  (void)extra;
  ++noop_launches;
  noop_last_grid[0] = config->gridDimX, noop_last_grid[1] = config->gridDimY, noop_last_grid[2] = config->gridDimZ;
  noop_last_block[0] = config->blockDimX, noop_last_block[1] = config->blockDimY;
  noop_last_block[2] = config->blockDimZ;
  noop_last_stream = config->hStream;
  noop_last_function = f;
  memset(noop_last_args, 0, sizeof(noop_last_args));
  for (int i = 0; params && i < NOOP_ARGS; ++i) memcpy(&noop_last_args[i], params[i], 8);
  return 0;
}

CUresult cuInit(unsigned int flags) { return 0; }
CUresult cuDriverGetVersion(int *version) { *version = 13000; return 0; }
CUresult cuDeviceGet(int *device, int ordinal) { *device = ordinal; return 0; }
CUresult cuDeviceGetCount(int *count) { *count = 1; return 0; }
CUresult cuCtxGetCurrent(void **ctx) { *ctx = (void *)0x1; return 0; }
CUresult cuCtxSetCurrent(void *ctx) { return 0; }
CUresult cuCtxGetDevice(int *device) { *device = 0; return 0; }
CUresult cuDevicePrimaryCtxRetain(void **ctx, int device) { *ctx = (void *)0x1; return 0; }
CUresult cuCtxGetLimit(size_t *value, int limit) { *value = 0; return 0; }
CUresult cuCtxSetLimit(int limit, size_t value) { return 0; }

CUresult cuDeviceGetAttribute(int *value, int attribute, int device) {
  switch (attribute) {
    case 1: *value = 1024; break;     /* max threads per block */
    case 10: *value = 32; break;      /* warp size */
    case 12: *value = 65536; break;   /* registers per block */
    case 13: *value = 1980000; break; /* SM clock, kHz */
    case 16: *value = 132; break;     /* multiprocessors */
    case 36: *value = 2619000; break; /* memory clock, kHz */
    case 37: *value = 5120; break;    /* memory bus width, bits */
    case 75: *value = 9; break;       /* compute capability major */
    case 76: *value = 0; break;       /* minor */
    case 81: *value = 233472; break;  /* shared memory per multiprocessor */
    case 97: *value = 232448; break;  /* shared memory per block, opt-in */
    default: *value = 0;
  }
  return 0;
}

CUresult cuModuleLoadData(void **module, const void *image) { *module = (void *)0x1; return 0; }
CUresult cuModuleUnload(void *module) { return 0; }
CUresult cuModuleGetFunction(void **function, void *module, const char *name) { *function = (void *)0x1; return 0; }
CUresult cuFuncGetAttribute(int *value, int attribute, void *function) {
  *value = attribute == 0 ? 1024 : 0; /* max threads per block; no registers, spills or static shared memory */
  return 0;
}
CUresult cuFuncSetAttribute(void *function, int attribute, int value) { return 0; }
CUresult cuFuncSetCacheConfig(void *function, int config) { return 0; }
CUresult cuOccupancyMaxActiveClusters(int *clusters, void *function, const void *config) { *clusters = 1; return 0; }

CUresult cuPointerGetAttribute(void *data, int attribute, uint64_t ptr) {
  if (attribute == 3) *(uint64_t *)data = ptr; /* the device address of a (CPU) pointer: itself */
  return 0;
}
CUresult cuGetErrorString(CUresult error, const char **text) { *text = "no-op libcuda"; return 0; }
CUresult cuTensorMapEncodeTiled() { return 0; }
CUresult cuTensorMapEncodeIm2col() { return 0; }
