"""`teachsweep bench mfu`: model FLOP utilisation of the teacher job's training step, in this process and as a
sweep's trial on Ray."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from teachsweep import models
from teachsweep.benchmarks.measure import (
    ProcessTreePeak,
    bench_sweep,
    matmul_flops,
    matmul_peak_gflops,
    peak_memory,
)
from teachsweep.jobs import teacher
from teachsweep.sweep import init_ray, quiet_libraries
from teachsweep.training import TaskData, autocast, pick_device, supervised_loss, to_device, uses_bf16

BERT_BASE_SHAPES = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}


def bert_base_directory(root: Path) -> Path:
    """A local model directory with BERT-base's shapes, random weights and MiniLM's tokenizer (the same uncased
    WordPiece vocabulary): loads like a hub checkpoint (`model: <dir>`), offline. Right for speed, not accuracy."""
    # heavy: transformers, which only --model bert-base needs here
    from transformers import AutoTokenizer, BertConfig, BertModel
    from transformers.utils import logging  # heavy: transformers, for the BERT-size model only

    logging.disable_progress_bar()
    directory = root / "bert-base-shapes"
    tokenizer = AutoTokenizer.from_pretrained(str(models.minilm_dir()))
    config = BertConfig(vocab_size=len(tokenizer), **BERT_BASE_SHAPES)
    BertModel(config, add_pooling_layer=False).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def teacher_step_flops(job: dict, samples: int = 4) -> float:
    """Mean matmul FLOPs (forward and backward) of the teacher job's training step on the global batches of its
    last epoch (same stream, seed and padding; `samples` of them, spread over the epoch), counted on the job's
    device. The model is counted with the explainable eager attention: the profiler has no FLOP count for SDPA's
    fused kernels, and the arithmetic is the same."""
    cfg = teacher.TeacherConfig.model_validate(job)
    device = pick_device(cfg.device)
    task_data = TaskData(cfg, [cfg.model])
    model = models.build_model(cfg.model, task_data.task, 0, cfg.bptt).to(device).train()
    steps = cfg.steps_per_epoch or task_data.steps_per_pass()
    stream = task_data.stream(cfg.seed)
    for _ in range((cfg.epochs - 1) * steps):
        next(stream)
    last_epoch = [next(stream) for _ in range(steps)]
    counted = last_epoch[:: max(1, steps // samples)][:samples]

    def step(batch: dict) -> None:
        with autocast(device, cfg.precision):
            loss = supervised_loss(model(batch)[0], batch["labels"])
        loss.backward()

    total = 0.0
    for batch in counted:
        on_device = to_device(batch, device)
        total += matmul_flops(lambda on_device=on_device: step(on_device))
        model.zero_grad(set_to_none=True)
    return total / len(counted)


def flop_utilisation(
    model_name: str,
    task: str,
    batch_size: int,
    max_length: int,
    steps: int,
    workers: int,
    device_name: str,
    sweep: bool,
    console: Console,
) -> None:
    """Model FLOP utilisation of the teacher job's training step: its matmul FLOPs per step over its measured time
    per step (the second epoch's: the first holds warm-up), against the device's measured matrix-product rate in
    the job's precision (bf16 where native, else fp32). In this process, and as a one-trial teachsweep sweep
    (a Ray Tune trial; with --workers > 1, a Ray Train TorchTrainer with DDP across that many workers/GPUs)."""
    quiet_libraries()
    device = pick_device(device_name)
    bf16 = uses_bf16(device, "auto")
    rows = []
    user_cache = os.environ.get("TEACHSWEEP_CACHE")
    with ProcessTreePeak() as tree, tempfile.TemporaryDirectory() as tmp:
        os.environ["TEACHSWEEP_CACHE"] = f"{tmp}/cache"  # the job saves its teacher: keep it out of the user's cache
        try:
            model = str(bert_base_directory(Path(tmp))) if model_name == "bert-base" else model_name
            job = {
                "task": task,
                "model": model,
                "batch_size": batch_size,
                "max_length": max_length,
                "epochs": 2,
                "patience": 2,
                "steps_per_epoch": steps,
                "max_eval_examples": 64,
                "lr": 1e-5,
                "device": str(device),
            }
            flops = teacher_step_flops(job)
            peak = 1e9 * matmul_peak_gflops(
                8192 if device.type == "cuda" else 2048, device=device, dtype=torch.bfloat16 if bf16 else torch.float32
            )
            rows.append(("in-process", 1, teacher.train(job)["time/step_s"], peak))
            if sweep:
                gpus = 1 if device.type == "cuda" else 0
                cpus = max(1, torch.get_num_threads() // workers)  # this process's threads, shared by the workers
                init_ray(total_cpus=workers * cpus + 1)  # (a local Ray: room for a multi-worker trial's driver too)
                _, (run,) = bench_sweep(
                    {
                        "name": "bench-mfu",
                        "job": "teacher",
                        "config": job | {"device": "auto"},
                        "variants": {"bench": {}},
                        "results_dir": f"{tmp}/sweep",
                        "resources": {"workers": workers, "gpus": gpus, "cpus": cpus},
                    }
                )
                arm = "sweep, Ray Train DDP" if workers > 1 else "sweep, Ray Tune trial"
                rows.append((arm, workers, run.data.metrics["time/step_s"], peak * (workers if gpus else 1)))
        finally:
            if user_cache is None:
                os.environ.pop("TEACHSWEEP_CACHE")
            else:
                os.environ["TEACHSWEEP_CACHE"] = user_cache

    precision = "bf16" if bf16 else "fp32"
    table = Table(
        title=f"bench mfu: teacher job, {model_name} on {task}, batch {batch_size} (text: at most "
        f"{max_length} tokens), {steps} steps x 2 epochs, {precision}, device {device}"
    )
    for column in ("arm", "workers", "s / step", "TFLOP/s", "MFU (of measured peak)"):
        table.add_column(column)
    for arm, count, step_s, arm_peak in rows:
        rate = flops / step_s
        table.add_row(arm, str(count), f"{step_s:.4g}", f"{rate / 1e12:.3g}", f"{100 * rate / arm_peak:.3g}%")
    console.print(table)
    console.print(
        f"matmul FLOPs per step {flops / 1e9:.3g} G (forward + backward, the last epoch's batches); "
        f"measured {precision} matmul peak {peak / 1e12:.3g} TFLOP/s per device"
    )
    console.print(peak_memory(tree))
