"""The model-FLOP-utilisation bench's parts: FLOPs counted on the job's own batches, the job's time per step; the SMaT
bench on the scaffold job's own run."""

import re

import pytest
from rich.console import Console

from teachsweep.benchmarks import mfu as bench
from teachsweep.benchmarks import scaffold as scaffold_bench

JOB = {"task": "digits", "model": "cnn:8", "epochs": 2, "steps_per_epoch": 3, "max_eval_examples": 32, "device": "cpu"}


def test_step_flops_follow_the_batch_the_job_draws():
    # digits images have one shape: twice the batch is exactly twice the matrix products, forward and backward
    small = bench.teacher_step_flops(JOB | {"batch_size": 16})
    large = bench.teacher_step_flops(JOB | {"batch_size": 32})
    assert small > 0
    assert large == pytest.approx(2 * small, rel=1e-9)


def test_the_mfu_bench_reports_the_teacher_jobs_own_step_time(tmp_path, monkeypatch):
    monkeypatch.setenv("TEACHSWEEP_CACHE", str(tmp_path))
    console = Console(record=True, width=200)
    bench.flop_utilisation("cnn:8", "digits", 16, 128, 3, 1, "cpu", False, console)
    text = console.export_text()
    (row,) = [line for line in text.splitlines() if "in-process" in line]
    step_s, tflops, mfu = [float(cell) for cell in re.findall(r"[\d.]+(?:e[-+]\d+)?", row)[-3:]]
    assert step_s > 0 and tflops > 0, row
    assert 0 < mfu <= 100, row


def test_the_scaffold_bench_times_the_jobs_own_iteration():
    """Built by the job's setup, with its lessons and explainer step: each arm is timed and counted, and a SMaT
    iteration does more matmul work than the plain student step."""
    console = Console(record=True, width=200)
    scaffold_bench.scaffold_cost(1, "tiny-bert", console, "cpu")
    rows = {}
    for line in console.export_text().splitlines():
        for arm, label in scaffold_bench.ARMS.items():
            if label in line:
                rows[arm] = [float(cell) for cell in re.findall(r"\d+\.\d+", line.split(label)[1])]
    assert set(rows) == set(scaffold_bench.ARMS), console.export_text()
    for seconds, ratio, gflop, flop_ratio in rows.values():
        assert seconds > 0 and ratio > 0 and gflop > 0 and flop_ratio >= 1.0
    assert rows["lookahead"][3] > rows["student_step"][3] > 1.0
