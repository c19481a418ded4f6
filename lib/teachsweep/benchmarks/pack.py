"""`teachsweep bench pack`: trials per hour of one job through the real sweep path (Ray Tune, the Optuna study,
MLflow runs, checkpoints), packed P at a time against one trial per process, side by side in one run, with each
configuration's peak memory per member.

Every configuration runs the same searched trials (the same space, sampler seed and number of samples) on the
same machine: P = 1 is the unpacked sweep, with as many trials at once as the machine has CPUs; a packed sweep
gives each pack the CPUs divided among the packs that run at once."""

from __future__ import annotations

import os
import tempfile

from rich.console import Console
from rich.table import Table

from teachsweep.benchmarks.measure import ProcessTreePeak, bench_sweep
from teachsweep.jobs import lot

JOBS = {
    "lot": {
        "config": lot.DIGITS_QUICK | {"batch_size": 32, "max_eval_examples": 200, "checkpoint_every": 1},
        "space": {
            "alpha": {"type": "loguniform", "low": 0.1, "high": 1.0},
            "temperature": {"type": "uniform", "low": 1.0, "high": 3.0},
        },
        "describe": "cnn:8 on digits, {steps} teacher steps x 2 epochs",
    },
    "lot_rl": {
        "config": {"task": "gym:CartPole-v1", "epochs": 2, "num_students": 1, "eval_episodes": 10},
        "space": {
            "alpha": {"type": "loguniform", "low": 0.1, "high": 1.0},
            "lr": {"type": "loguniform", "low": 1e-4, "high": 1e-3},
        },
        "describe": "PPO on CartPole-v1, 8 envs, {steps} environment steps x 2 epochs",
    },
}
STEPS = {"lot": "steps_per_epoch", "lot_rl": "steps_per_epoch"}


def bench_spec(job: str, name: str, results: str, samples: int, pack: int, steps: int, cpus: int, device: str):
    """The sweep one configuration of the bench runs."""
    packs_at_once = max(1, min(cpus, -(-samples // pack)))
    per_trial = max(1, cpus // packs_at_once)
    return {
        "name": name,
        "job": job,
        "config": JOBS[job]["config"] | {STEPS[job]: steps, "device": device},
        "space": JOBS[job]["space"],
        "num_samples": samples,
        "sampler": {"type": "random", "seed": 0},
        "max_concurrent_trials": packs_at_once,
        "resources": {"cpus": per_trial, "pack": pack} | ({"gpus": 1} if device.startswith("cuda") else {}),
        "results_dir": results,
    }


def pack_throughput(job: str, samples: int, packs: list[int], steps: int, console: Console, device: str = "cpu"):
    import ray  # heavy: the sweeps run on Ray

    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    rows = []
    try:
        with tempfile.TemporaryDirectory() as results:
            for pack in packs:
                spec = bench_spec(job, f"bench-pack-{pack}", results, samples, pack, steps, cpus, device)
                with ProcessTreePeak(interval=0.5) as memory:
                    wall, runs = bench_sweep(spec)
                members = sum(1 for run in runs if run.data.tags.get("teachsweep.role") == "trial")
                rows.append((pack, wall, members, memory.peak))
    finally:
        ray.shutdown()
    base_rate = samples / rows[0][1] * 3600 if rows and rows[0][0] == 1 else None
    table = Table(
        title=f"bench pack: {job} ({JOBS[job]['describe'].format(steps=steps)}), {samples} searched trials, "
        f"{cpus} CPUs, {device}"
    )
    for column in ("P", "wall s", "trials", "trials/hour", "vs P=1", "peak RSS / trial"):
        table.add_column(column, justify="right")
    for pack, wall, members, peak in rows:
        rate = members / wall * 3600
        concurrent = min(-(-samples // pack), cpus) * pack
        table.add_row(
            "1 (unpacked)" if pack == 1 else str(pack),
            f"{wall:.1f}",
            str(members),
            f"{rate:.0f}",
            f"{rate / base_rate:.2f}x" if base_rate else "-",
            f"{peak / concurrent / 2**20:.0f} MiB",
        )
    console.print(table)
    console.print(
        "peak RSS / trial: the peak resident memory of the driver and every Ray process during the sweep, over the "
        "trials training at once (packs at once x P); it includes Ray's and MLflow's own processes."
    )
