"""A Triton driver for a CUDA GPU that is not there: kernels compile for a real target, launches do nothing.

    from ftsam_plugin.kernels import null_driver
    with null_driver.installed(arch=90, record=True) as driver:  # before any kernel's first launch
        plan = kernels.create_plan(cpu_params, backend="triton")
        plan.grad_norm()                       # compiled for sm_90, "launched" on the CPU tensors
    driver.launches[-1].args                   # what the launcher was handed

What runs is everything a CUDA launch runs on the host: Triton's `kernel[grid](...)` (binding, specialisation,
the cache look-up, its checks) or a plan's fast path, up to the compiled kernel's launcher, which here records
its arguments (or nothing) instead of calling cuLaunchKernel. For timing that host path, and for checking what
it hands the launcher, on a machine without a GPU (Triton ships ptxas, so compiling needs none). Kernels must
not be launched interpreted (TRITON_INTERPRET unset) and are compiled on their first launch under this driver.
"""

import collections
import contextlib

import triton
from triton.backends.compiler import GPUTarget

from ftsam_plugin.kernels import sam_triton  # absolute: benchmarks/sam_host_cost.py loads this file by path

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


class NullDriver:
    """The driver methods Triton's launch path calls, for one GPU of compute capability `arch` (device 0).

    `launches`: a list each launch appends a `LaunchRecord` to when `record`; `stream`: what get_current_stream
    returns (set it to see a launch take the current stream)."""

    def __init__(self, arch=90, record=False):
        self.target = GPUTarget("cuda", arch, 32)
        self.utils, self.launches, self.record, self.stream = _Utils(), [], record, 0
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


def install(arch=90, record=False):
    """Make a NullDriver Triton's active driver, and let the plans take CPU tensors, from now on; returns it."""
    if sam_triton.INTERPRET:
        raise RuntimeError("TRITON_INTERPRET=1 is set: kernels are interpreted, nothing would be compiled")
    driver = NullDriver(arch, record)
    triton.runtime.driver.set_active(driver)
    sam_triton.LAUNCH_ON_CPU = True
    return driver


@contextlib.contextmanager
def installed(arch=90, record=False):
    """`install` inside the block (yields the driver); the previous driver and CPU rule after it."""
    config = triton.runtime.driver
    previous = getattr(config, "_active", None)  # not `.active`: without a GPU, making the default one fails
    cpu_ok = getattr(sam_triton, "LAUNCH_ON_CPU", False)
    try:
        yield install(arch, record)
    finally:
        config.set_active(previous)
        sam_triton.LAUNCH_ON_CPU = cpu_ok


__all__ = ["LaunchRecord", "NullDriver", "install", "installed"]
