"""The `teachsweep bench ...` commands: each runs one bench of teachsweep.benchmarks on the command line's console.

Each imports its bench when it runs (heavy: the benches load torch, Ray and the jobs; the command line's other
commands do not wait for them)."""

from __future__ import annotations

from typing import Annotated

import typer

from teachsweep.cli.terminal import console

Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:1... (auto: CUDA when visible)")]


def bench_overhead(
    trials: int = typer.Option(4, help="trials of the small sweeps (the large ones run 3x as many)"),
    steps: int = typer.Option(40, help="teacher steps per trial (sizes the job)"),
) -> None:
    """Per-trial overhead of a teachsweep sweep versus a bare Ray Tune function trainable doing the same job."""
    from teachsweep.benchmarks.overhead import overhead  # heavy: Ray and torch

    overhead(trials, steps, console)


def bench_lot(
    steps: int = typer.Option(30, help="teacher steps per measurement"),
    repeats: int = typer.Option(3, help="interleaved repeats per arm (the median is shown)"),
    model: str = typer.Option("resnet:8", help="teacher and student architecture"),
    device: Device = "auto",
) -> None:
    """LoT's cost per teacher step for N in {1, 2, 4} against the teacher-only step and the FLOP ideal."""
    from teachsweep.benchmarks.lot import lot_cost  # heavy: torch

    lot_cost(steps, repeats, model, console, device)


def bench_relevance(
    examples: int = typer.Option(256, help="examples explained per model"),
    batch_size: int = typer.Option(32, help="batch size of the batched explainers"),
    model: list[str] = typer.Option(
        ["minilm", "vit:4"], help="models, each on its task (text: rotten_tomatoes, image: mnist_5k); repeatable"
    ),
    device: Device = "cpu",
) -> None:
    """Relevance explanations per second: batched generic rule (and rollout, GradCAM, LRP) vs one example at a
    time, with the matmul GFLOP/s each reaches against this machine's (or the GPU's) peak."""
    from teachsweep.benchmarks.relevance import relevance_throughput  # heavy: torch

    relevance_throughput(examples, batch_size, model, console, device)


def bench_scaffold(
    steps: int = typer.Option(20, help="interleaved iterations per arm (the median is shown)"),
    model: str = typer.Option("minilm:2", help="teacher and student architecture"),
    device: Device = "cpu",
) -> None:
    """One SMaT iteration (student step + look-ahead + meta step) over one plain student step, same batch."""
    from teachsweep.benchmarks.scaffold import scaffold_cost  # heavy: torch

    scaffold_cost(steps, model, console, device)


def bench_mfu(
    model: str = typer.Option("minilm", help="a model name or directory, or bert-base (its shapes, random weights)"),
    task: str = typer.Option("rotten_tomatoes", help="the task the teacher job trains on"),
    batch_size: int = typer.Option(32, help="global batch size"),
    max_length: int = typer.Option(128, help="text: tokens per example at most"),
    steps: int = typer.Option(20, help="training steps per epoch (two epochs; the second is timed)"),
    workers: int = typer.Option(1, help="workers of the sweep's trial (> 1: Ray Train DDP, one GPU each)"),
    device: Device = "auto",
    sweep: bool = typer.Option(True, help="also run the job as a one-trial sweep on Ray"),
) -> None:
    """Model FLOP utilisation of the teacher job's training step, in process and as a sweep's trial on Ray."""
    from teachsweep.benchmarks.mfu import flop_utilisation  # heavy: Ray and torch

    flop_utilisation(model, task, batch_size, max_length, steps, workers, device, sweep, console)


def bench_rl(
    rollouts: int = typer.Option(20, help="rollouts (teacher updates) per run"),
    repeats: int = typer.Option(3, help="interleaved repeats per loop (the median is shown)"),
    task: str = typer.Option("gym:CartPole-v1", help="an RL task (gym:, minatar:, ale:)"),
    device: str = typer.Option("cpu", help="cpu, cuda, auto... (small policies run best on the CPU)"),
) -> None:
    """Teacher-only PPO's env steps per second against a minimal PPO loop, and LoT's time per teacher update
    against teacher-only beside the FLOP ideal."""
    from teachsweep.benchmarks.rl import rl_cost  # heavy: torch and gymnasium

    rl_cost(rollouts, repeats, task, console, device)


def bench_distributed(
    steps: int = typer.Option(60, help="teacher steps per run"),
    repeats: int = typer.Option(2, help="interleaved repeats per arm (the fastest is shown)"),
) -> None:
    """The same job in-process, under a 1-worker TorchTrainer and a 2-worker gloo TorchTrainer: time per step
    and fixed start-up cost."""
    from teachsweep.benchmarks.distributed import distributed_cost  # heavy: Ray and torch

    distributed_cost(steps, repeats, console)


def bench_pack(
    job: str = typer.Option("lot", help="the job: lot (digits, cnn:8) or lot_rl (CartPole)"),
    samples: int = typer.Option(16, help="searched trials in every configuration"),
    packs: list[int] = typer.Option([1, 4, 16], "--pack", help="pack sizes P (1: one trial per process); repeatable"),
    steps: int = typer.Option(20, help="steps per epoch, 2 epochs (lot: teacher steps; lot_rl: env steps, k x 1024)"),
    device: str = typer.Option("cpu", help="cpu, or cuda (each pack then reserves one GPU)"),
) -> None:
    """Trials per hour through the real sweep path, packed P at a time against one trial per process."""
    from teachsweep.benchmarks.pack import pack_throughput  # heavy: Ray and torch

    pack_throughput(job, samples, packs, steps, console, device)
