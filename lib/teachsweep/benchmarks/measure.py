"""The measurement toolkit the benches share: wall-clock seconds (GPU work included), the matrix-product peak and
FLOP counts, peak resident memory (this process, its children, its whole process tree), and a sweep run for its
numbers."""

from __future__ import annotations

import ctypes
import gc
import resource
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import yaml
from torch.profiler import ProfilerActivity, profile

from teachsweep.spec import parse_spec
from teachsweep.tracking import RetryingClient
from teachsweep.training import synchronize


def seconds(work: Callable[[], Any], device: torch.device | None = None) -> float:
    """Wall-clock seconds of `work()`, including the GPU work it queued."""
    if device is not None:
        synchronize(device)
    start = time.perf_counter()
    work()
    if device is not None:
        synchronize(device)
    return time.perf_counter() - start


def matmul_peak_gflops(
    size: int = 2048, repeats: int = 10, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> float:
    """This machine's (or `device`'s) matrix-product rate in `dtype` (default float32): the best of `repeats`
    square products."""
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # first use: kernel selection, allocation
    return max(2 * size**3 / seconds(lambda: a @ b, a.device) / 1e9 for _ in range(repeats))


def matmul_flops(work: Callable[[], Any]) -> float:
    """Floating-point operations of the matrix products (mm, bmm, addmm, ...) one call of `work` runs, as the
    PyTorch profiler counts them: a hardware-independent cost, what a saturated accelerator's time follows.

    Keep `work` small (one batch, one iteration): to count FLOPs the profiler records input shapes, which holds
    a reference to every op's inputs and outputs until the profile is released, so memory grows with all the
    work profiled, not with what it keeps (pytorch/pytorch#133444)."""
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        work()
    flops = float(sum(event.flops for event in prof.key_averages() if event.flops))
    del prof  # its records hold the tensors: release them now, not when the caller's frame goes
    release_freed_memory()
    return flops


def release_freed_memory() -> None:
    """Hands the heap's freed pages back to the system (glibc keeps them otherwise: after a profile of a few GB,
    this process would stay that large, and the next profile would start from there)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def peak_memory(tree: ProcessTreePeak | None = None) -> str:
    """One line: the peak resident memory of this process (its exact high-water mark, from getrusage), the
    largest of any finished child processes (getrusage counts only children already waited for, such as Ray's
    after ray.shutdown()), and, with `tree`, the sampled peak of this process and all its live descendants
    summed."""
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    parts = [f"this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2**30:.2f} GiB"]
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * unit
    if children:
        parts.append(f"largest finished child process {children / 2**30:.2f} GiB")
    if tree is not None and tree.peak:
        parts.append(
            f"this process and its descendants together {tree.peak / 2**30:.2f} GiB (summed resident "
            f"memory sampled every {tree.interval:g} s: shared pages count in each process)"
        )
    return "peak resident memory: " + ", ".join(parts)


class ProcessTreePeak:
    """While open, samples every `interval` seconds the resident memory of this process and all its live
    descendants (Ray's raylet and workers, TorchTrainer workers), summed, and keeps the largest sum in `peak`
    (bytes). Short spikes between samples are missed; processes of a cluster this one only connected to
    (RAY_ADDRESS) are not its descendants and are not counted."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="bench-memory", daemon=True)

    def __enter__(self) -> ProcessTreePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        try:
            import psutil  # Ray's dependency (and vendored by it): every bench that starts processes imports Ray
        except ImportError:
            return
        me = psutil.Process()
        while True:
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:  # it ended between the listing and the reading
                    pass
            self.peak = max(self.peak, total)
            if self._stop.wait(self.interval):
                return


def bench_sweep(spec: dict) -> tuple[float, list]:
    """Run a teachsweep sweep from a spec dict (the driver's Ray already started): (wall seconds, its trial runs
    in MLflow). A failed trial stops the bench: its numbers would mean nothing."""
    from teachsweep.sweep import run_sweep  # heavy: Ray and torch, for the benches that run a sweep

    spec_text = yaml.safe_dump(spec, sort_keys=False)
    begin = time.perf_counter()
    outcome = run_sweep(parse_spec(spec_text), spec_text)
    wall = time.perf_counter() - begin
    failed = [row for row in outcome.trials if row["status"] != "OK"]
    if failed:
        raise RuntimeError(f"bench sweep {spec['name']}: trial {failed[0]['trial_id']} failed: {failed[0]['error']}")
    client = RetryingClient(outcome.tracking_uri)
    experiment_id = client.get_experiment_by_name(spec["name"]).experiment_id
    return wall, client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
