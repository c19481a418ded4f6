"""`teachsweep bench lot`: LoT's time per teacher step for N in {1, 2, 4} against the teacher-only step and the
FLOP ideal."""

from __future__ import annotations

import statistics

from rich.console import Console
from rich.table import Table

from teachsweep.benchmarks.measure import peak_memory
from teachsweep.jobs import lot

LOT_BENCH_JOB = {
    "task": "mnist_5k",
    "teacher": "resnet:8",
    "batch_size": 64,
    "epochs": 1,
    "max_eval_examples": 64,
    "optimizer": "sgd",
    "lr": 0.05,
    "alpha": 0.5,
    "temperature": 1.5,
}


def lot_cost(steps: int, repeats: int, model: str, console: Console, device: str = "auto") -> None:
    """Time per teacher step of LoT over the teacher-only step, for N in {1, 2, 4}, equal-sized models, next
    to the FLOP ideal (6 + 4(N-1)) / 3 (forward = 1 unit, backward = 2)."""
    job = LOT_BENCH_JOB | {"teacher": model, "steps_per_epoch": steps, "device": device}
    lot.train(job | {"steps_per_epoch": 3})  # warm-up: data, kernels
    arms = [("teacher_only", 1), ("lot", 1), ("lot", 2), ("lot", 4)]
    timings: dict[tuple[str, int], list[float]] = {arm: [] for arm in arms}
    for _ in range(repeats):  # interleaved, so that drift in machine speed hits every arm alike
        for arm, n in arms:
            metrics = lot.train(job | {"arm": arm, "student_steps": n})
            timings[(arm, n)].append(metrics["time/teacher_step_s"])
    base = statistics.median(timings[("teacher_only", 1)])
    table = Table(
        title=f"bench lot: {model} on mnist_5k, batch 64, {steps} teacher steps x {repeats} repeats, device {device}"
    )
    for column in ("arm", "N", "s / teacher step", "ratio to teacher-only", "FLOP ideal", "ratio / ideal"):
        table.add_column(column)
    for arm, n in arms:
        step = statistics.median(timings[(arm, n)])
        ideal = 1.0 if arm == "teacher_only" else (6 + 4 * (n - 1)) / 3
        table.add_row(arm, str(n), f"{step:.4f}", f"{step / base:.2f}", f"{ideal:.2f}", f"{step / base / ideal:.2f}")
    console.print(table)
    console.print(peak_memory())
