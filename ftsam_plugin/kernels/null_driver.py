"""A Triton driver for a CUDA GPU that is not there: kernels compile for a real target, launches do nothing.

    from ftsam_plugin.kernels import null_driver
    with null_driver.installed(arch=90, record=True) as driver:  # before any kernel's first launch
        plan = kernels.create_plan(cpu_params, backend="triton")
        plan.grad_norm()                       # compiled for sm_90, "launched" on the CPU tensors
    driver.launches[-1].args                   # what the launcher was handed

What runs is everything a CUDA launch runs on the host: Triton's `kernel[grid](...)` (binding, specialisation,
the cache look-up, its checks) or a plan's fast path, up to the compiled kernel's launcher. With
launcher="stub" (default) that launcher is a Python stand-in that records its arguments (or nothing). With
launcher="triton" it is Triton's own (CudaLauncher and the C launch of its NVIDIA backend: arguments unpacked,
each pointer checked with cuPointerGetAttribute, cuLaunchKernelEx called) linked against a no-op libcuda.so.1
built here from noop_libcuda.c, which counts launches and keeps the last one's grid and argument words
(`driver.cuda_launches()`, `driver.last_cuda_launch()`): all a GPU launch costs on the host but the driver's own
work. For timing that host path, and for checking what it hands the launcher, on a machine without a GPU
(Triton ships ptxas, so compiling needs none). Kernels must not be launched interpreted (TRITON_INTERPRET
unset) and are compiled on their first launch under this driver; launcher="triton" is for processes that never
touch a real CUDA driver (it makes its stand-in libcuda.so.1 the process's).
"""

import collections
import contextlib
import ctypes
import functools
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

from ftsam_plugin.kernels import sam_triton  # absolute: benchmarks/sam_host_cost.py loads this file by path
from ftsam_plugin.kernels.native_build import shared_library

LAUNCHERS = ("stub", "triton")

LaunchRecord = collections.namedtuple("LaunchRecord", "grid stream function metadata hooks args")
_PROPERTIES = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32,
               "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}


class _Utils:
    def get_device_properties(self, device):
        return dict(_PROPERTIES)

    def load_binary(self, name, kernel, shared, device):
        return object(), len(name), 32, 0, 1024  # module, function handle, registers, spills, max threads

    def unload_module(self, module):
        return None


@functools.lru_cache(maxsize=None)
def noop_libcuda():
    """The no-op libcuda.so.1 (noop_libcuda.c, built once), loaded into the process ahead of any other: Triton's
    modules that link libcuda.so.1 (or dlopen it) get this one. Returns the ctypes handle and its folder."""
    path = shared_library("libcuda", Path(__file__).with_name("noop_libcuda.c"),
                          ["-shared", "-fPIC", "-O2", "-Wl,-soname,libcuda.so.1"], suffix=".so.1")
    return ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL), path.parent


def _triton_launcher():
    """(utils, launcher class) of Triton's NVIDIA backend, its C module built against the no-op libcuda."""
    lib, folder = noop_libcuda()
    from triton import knobs

    knobs.nvidia.libcuda_path = str(folder)  # where Triton's build looks for libcuda.so.1 to link
    from triton.backends.nvidia.driver import CudaLauncher
    from triton.backends.nvidia.driver import CudaUtils

    return CudaUtils(), CudaLauncher


class NullDriver:
    """The driver methods Triton's launch path calls, for one GPU of compute capability `arch` (device 0).

    `launches`: a list each stub launch appends a `LaunchRecord` to when `record`; `stream`: what
    get_current_stream returns (set it to see a launch take the current stream). `launcher`: "stub" or "triton"
    (see the module docstring)."""

    def __init__(self, arch=90, record=False, launcher="stub"):
        if launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
        self.target = GPUTarget("cuda", arch, 32)
        self.utils, self.launches, self.record, self.stream = _Utils(), [], record, 0
        self._libcuda = None
        if launcher == "triton":
            self.utils, self.launcher_cls = _triton_launcher()
            self._libcuda = noop_libcuda()[0]
            return
        driver = self

        class Launcher:
            def __init__(self, src, metadata):
                self.name = src.fn.__name__ if hasattr(src, "fn") else str(src)

            def __call__(self, gx, gy, gz, stream, function, metadata, launch_metadata, enter, exit_, *args):
                if driver.record:
                    driver.launches.append(LaunchRecord((gx, gy, gz), stream, function, metadata,
                                                  (launch_metadata, enter, exit_), args))

        self.launcher_cls = Launcher

    @staticmethod
    def is_active():
        return True

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return self.stream

    def get_current_target(self):
        return self.target

    def cuda_launches(self):
        """cuLaunchKernelEx calls so far (launcher="triton")."""
        return ctypes.c_longlong.in_dll(self._libcuda, "noop_launches").value

    def last_cuda_launch(self):
        """The last cuLaunchKernelEx call (launcher="triton"): grid, block, stream, function, and the first 5
        argument words (8 bytes read at each kernel argument: a pointer's address, or a 4-byte value below)."""
        lib = self._libcuda
        words = list((ctypes.c_uint64 * 5).in_dll(lib, "noop_last_args"))
        return dict(grid=tuple((ctypes.c_uint * 3).in_dll(lib, "noop_last_grid")),
                    block=tuple((ctypes.c_uint * 3).in_dll(lib, "noop_last_block")),
                    stream=ctypes.c_void_p.in_dll(lib, "noop_last_stream").value or 0,
                    function=ctypes.c_void_p.in_dll(lib, "noop_last_function").value or 0, args=words)


def install(arch=90, record=False, launcher="stub"):
    """Make a NullDriver Triton's active driver, and let the plans take CPU tensors, from now on; returns it."""
    if sam_triton.INTERPRET:
        raise RuntimeError("TRITON_INTERPRET=1 is set: kernels are interpreted, nothing would be compiled")
    driver = NullDriver(arch, record, launcher)
    triton.runtime.driver.set_active(driver)
    sam_triton.LAUNCH_ON_CPU = True
    return driver


@contextlib.contextmanager
def installed(arch=90, record=False, launcher="stub"):
    """`install` inside the block (yields the driver); the previous driver and CPU rule after it."""
    config = triton.runtime.driver
    previous = getattr(config, "_active", None)  # not `.active`: without a GPU, making the default one fails
    cpu_ok = getattr(sam_triton, "LAUNCH_ON_CPU", False)
    try:
        yield install(arch, record, launcher)
    finally:
        config.set_active(previous)
        sam_triton.LAUNCH_ON_CPU = cpu_ok


__all__ = ["LAUNCHERS", "LaunchRecord", "NullDriver", "install", "installed", "noop_libcuda"]
