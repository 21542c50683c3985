"""Timers for the kernel benchmarks: GPU time from CUDA events with the host kept out of it; wall clock on CPU.

Imported by benchmarks/gpu_check.py and benchmarks/bench_sam_step.py (run as scripts, so this folder is on
sys.path). Only APIs present in torch 2.1+ (the GPU image has torch 2.11).
"""

import statistics
import time

import torch

L2_FLUSH_BYTES = 256 * 2**20  # more than the L2 of any current GPU (H100 50 MB, H200 60 MB)
SLEEP_CYCLES_PER_S = 2e9  # GPU clock to size the head start (an overestimate only makes the sleep longer)


def time_cuda(fn, reps, flush=True):
    """Median µs of GPU time of `fn` (CUDA events around each call).

    `fn` runs once first (compilation, allocator warm-up). Then the GPU is put to sleep for about twice the
    host time of queueing every rep, and all reps are queued back to back behind it, each preceded by an L2
    flush outside its timed span: the events see the kernels, not the Python launching them. A route whose
    host work outlasts the head start (many tiny launches) shows its launch gaps in the later reps; that is
    its real cost and is reported as measured.
    """
    buf = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda") if flush else None
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    if buf is not None:
        buf.zero_()
    fn()
    host_s = time.perf_counter() - start
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    torch.cuda._sleep(int(min(4e9, max(1e6, 2 * reps * host_s * SLEEP_CYCLES_PER_S))))
    for begin, end in events:
        if buf is not None:
            buf.zero_()
        begin.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(b.elapsed_time(e) for b, e in events) * 1e3


def time_host(fn, reps):
    """Median wall-clock µs per call of `fn` (on CUDA: host time only, the GPU kept busy so it never waits)."""
    fn()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda._sleep(int(2e9))  # ~1 s of GPU work: the queue never runs dry, launches never block
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    if cuda:
        torch.cuda.synchronize()
    return statistics.median(samples)


def time_wall(fn, reps):
    """Median wall-clock µs per call of `fn`, synchronising a GPU after each call (CPU: plain wall clock)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


__all__ = ["L2_FLUSH_BYTES", "time_cuda", "time_host", "time_wall"]
