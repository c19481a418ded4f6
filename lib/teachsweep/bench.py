"""Benchmarks: each prints a table of what it measured in one run, with the command's parameters."""

from __future__ import annotations

import resource
import statistics
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

OVERHEAD_JOB = {
    "task": "digits",
    "teacher": "cnn:16",
    "alpha": 0.5,
    "student_steps": 2,
    "batch_size": 64,
    "epochs": 2,
    "max_eval_examples": 200,
    "optimizer": "sgd",
    "lr": 0.05,
    "weight_decay": 0.0,
}


def bench_sweep(spec: dict) -> tuple[float, list]:
    """Run a teachsweep sweep from a spec dict (the driver's Ray already started): (wall seconds, its trial runs
    in MLflow). A failed trial stops the bench: its numbers would mean nothing."""
    from mlflow.tracking import MlflowClient

    from teachsweep.spec import parse_spec
    from teachsweep.sweep import run_sweep

    spec_text = yaml.safe_dump(spec, sort_keys=False)
    begin = time.perf_counter()
    outcome = run_sweep(parse_spec(spec_text), spec_text)
    wall = time.perf_counter() - begin
    failed = [row for row in outcome.trials if row["status"] != "OK"]
    if failed:
        raise RuntimeError(f"bench sweep {spec['name']}: trial {failed[0]['trial_id']} failed: {failed[0]['error']}")
    client = MlflowClient(outcome.tracking_uri)
    experiment_id = client.get_experiment_by_name(spec["name"]).experiment_id
    return wall, client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")


def overhead(trials: int, steps: int, console: Console) -> None:
    """Wall time outside the job for (b) a bare Tune function trainable running the job (Tune's defaults, and
    with reuse_actors) and (c) a teachsweep sweep (Optuna RDB + MLflow + reporter + checkpoints), each at k and
    3k trials run one at a time: the difference gives the marginal overhead per trial, the rest is the fixed
    cost per sweep (for teachsweep: creating the MLflow store, the study, the parent run, the final tables)."""
    import ray
    from ray import tune

    from teachsweep.jobs import lot
    from teachsweep.sweep import init_ray, quiet_libraries

    quiet_libraries()
    job = OVERHEAD_JOB | {"steps_per_epoch": max(1, steps // 2)}
    lot.train(job)  # warm caches (data, kernels) so that (a) is not charged for first-use costs
    start = time.perf_counter()
    lot.train(job)
    job_s = time.perf_counter() - start

    def bare_tune(count: int, reuse: bool, storage: str) -> tuple[float, float]:
        def bare_trainable(config):
            begin = time.perf_counter()
            lot.train(job | {"alpha": config["alpha"]})
            tune.report({"job_s": time.perf_counter() - begin})

        begin = time.perf_counter()
        grid = tune.Tuner(
            bare_trainable,
            param_space={"alpha": tune.grid_search([0.5] * count)},
            tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=reuse),
            run_config=tune.RunConfig(name=f"bare-{reuse}-{count}", storage_path=storage, verbose=0),
        ).fit()
        return time.perf_counter() - begin, sum(r.metrics["job_s"] for r in grid)

    def teachsweep_sweep(count: int, storage: str) -> tuple[float, float]:
        name = f"bench-overhead-{count}"
        spec = {
            "name": name,
            "job": "lot",
            "config": job,
            "space": {"alpha": {"type": "uniform", "low": 0.4999, "high": 0.5001}},
            "num_samples": count,
            "max_concurrent_trials": 1,
            "results_dir": str(Path(storage) / name),
        }
        wall, runs = bench_sweep(spec)
        return wall, sum(run.data.metrics["time/job_s"] for run in runs)

    init_ray()
    arms = {
        "(b) bare Tune trainable, Tune defaults": lambda n, tmp: bare_tune(n, False, tmp),
        "(b') bare Tune trainable, reuse_actors": lambda n, tmp: bare_tune(n, True, tmp),
        "(c) teachsweep sweep (reuse_actors)": teachsweep_sweep,
    }
    measured = {}
    with ProcessTreePeak() as tree, tempfile.TemporaryDirectory() as tmp:
        for name, run in arms.items():
            measured[name] = [run(n, tmp) for n in (trials, 3 * trials)]
        ray.shutdown()

    table = Table(
        title=f"bench overhead: {trials} and {3 * trials} trials of {steps} teacher steps, one at a time "
        f"(the job alone: {job_s:.2f} s)"
    )
    for column in (
        "",
        f"wall s ({trials} / {3 * trials})",
        "inside jobs s",
        "overhead s / trial (marginal)",
        "fixed s / sweep",
    ):
        table.add_column(column)
    per_trial = {}
    for name, ((wall_k, in_k), (wall_3k, in_3k)) in measured.items():
        per_trial[name] = ((wall_3k - in_3k) - (wall_k - in_k)) / (2 * trials)
        fixed = (wall_k - in_k) - trials * per_trial[name]
        table.add_row(
            name, f"{wall_k:.1f} / {wall_3k:.1f}", f"{in_k:.1f} / {in_3k:.1f}", f"{per_trial[name]:.2f}", f"{fixed:.1f}"
        )
    console.print(table)
    ours = per_trial["(c) teachsweep sweep (reuse_actors)"]
    for name in list(arms)[:2]:
        console.print(
            f"marginal per-trial overhead, teachsweep / {name[4:]}: {ours / per_trial[name]:.2f}x (target <= 1.1x)"
        )
    console.print(
        f"fraction of wall time inside the job for 60 s trials at this overhead: {60 / (60 + ours):.3f}"
        " (target >= 0.85)"
    )
    console.print(peak_memory(tree))


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
    from teachsweep.jobs import lot

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


def relevance_throughput(
    examples: int, batch_size: int, model_names: list[str], console: Console, device_name: str = "cpu"
) -> None:
    """Explanations per second of the batched relevance explainers versus a loop over single examples (the
    reference code's way), same model, same inputs, one run: text models on rotten_tomatoes test sentences,
    image models on mnist_5k test digits (weights as initialised: the cost does not depend on them).

    Beside the speed-up, the matmul GFLOP/s each way reaches and this machine's float32 matmul peak: the loop's
    FLOPs are the useful work, so peak / (loop GFLOP/s) bounds what any batching can gain here. FLOPs are counted
    first, one batch per profile (see run_flops), so memory stays at one batch's worth whatever `examples` is, and
    before the warm-up, so no timed run follows a profile. On a GPU (`device_name`), every timing waits for the
    queued kernels, and the peak is the device's."""
    import torch

    from teachsweep import data, models, tasks
    from teachsweep.explain import lrp, relevance
    from teachsweep.training import pick_device, to_device

    device = pick_device(device_name)
    peak = matmul_peak_gflops(device=device)
    explainers = {name: relevance.EXPLAINERS[name] for name in ("relevance", "rollout", "attention_gradcam")}
    explainers["lrp"] = lrp.lrp_attribution
    for model_name in model_names:
        kind = "image" if models.parse_name(model_name)[0] in models.IMAGE_MODELS else "text"
        task = tasks.load_task("mnist_5k" if kind == "image" else "rotten_tomatoes")
        model = models.build_model(model_name, task, seed=0).eval().to(device)
        tokenizer = models.load_tokenizer(model_name) if kind == "text" else None
        batches = data.make_batches(task, "test", tokenizer, 64, examples)
        inputs = [to_device(batch, device) for batch in data.eval_batches(batches, batch_size, by_length=True)]
        where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else str(device)
        table = Table(title=f"bench relevance: {model_name}, {examples} {task.name} test examples, {where}")
        for column in (
            "explainer",
            f"batched ({batch_size}) expl/s",
            "single-example loop expl/s",
            "speed-up",
            "GFLOP/s batched / loop",
            "ceiling here",
        ):
            table.add_column(column)
        flops = {
            name: [run_flops(explainer, model, inputs, one_by_one) for one_by_one in (0, 1)]
            for name, explainer in explainers.items()
        }
        for one_by_one in (0, 1):  # every input shape once before any timing, so no arm pays first-use costs
            explain_all(relevance.generic_rule, model, inputs, one_by_one)
        rows = []
        for name, explainer in explainers.items():
            batched, single = (partial(explain_all, explainer, model, inputs, one_by_one) for one_by_one in (0, 1))
            batched_s, single_s = seconds(batched, device), seconds(single, device)
            rows.append((name, batched_s, single_s, flops[name][0] / batched_s / 1e9, flops[name][1] / single_s / 1e9))
        # a peak read in a slow moment of a shared machine must not fall below what the explainers reached
        peak = max(peak, *(row[3] for row in rows))
        for name, batched_s, single_s, batched_rate, single_rate in rows:
            table.add_row(
                name,
                f"{examples / batched_s:.1f}",
                f"{examples / single_s:.1f}",
                f"{single_s / batched_s:.1f}x",
                f"{batched_rate:.1f} / {single_rate:.1f}",
                f"{peak / single_rate:.1f}x",
            )
        table.caption = f"float32 matmul peak {peak:.0f} GFLOP/s"
        console.print(table)
        console.print(peak_memory(), f"(after {model_name})")
        del model, batches, inputs  # before the next model is built
    console.print(
        "ceiling here: the speed-up batching would reach if it ran the loop's FLOPs at the matmul peak "
        "(target for the generic rule: >= 8x)"
    )


def explain_all(explainer, model, inputs: list[dict], one_by_one: bool) -> None:
    from teachsweep.explain import relevance

    for batch in inputs:
        relevance.single_example_loop(explainer, model, batch) if one_by_one else explainer(model, batch)


def run_flops(explainer, model, inputs: list[dict], one_by_one: bool) -> float:
    """The matmul FLOPs of explain_all(explainer, model, inputs, one_by_one), counted one batch per profile (a
    profile with FLOPs records shapes, and so holds every tensor the profiled work made until it stops: one
    profile over all the inputs held every example's activations at once, tens of GB at the default 256
    examples) and once per distinct input (the same shapes and real lengths run the same matmuls: every image
    batch of a size is profiled once)."""
    counted: dict[tuple, float] = {}
    total = 0.0
    for batch in inputs:
        mask = batch.get("attention_mask")
        key = (
            tuple((name, tuple(value.shape)) for name, value in batch.items()),
            None if mask is None else tuple(mask.sum(-1).tolist()),
        )
        if key not in counted:
            counted[key] = matmul_flops(partial(explain_all, explainer, model, [batch], one_by_one))
        total += counted[key]
    return total


def seconds(work, device=None) -> float:
    """Wall-clock seconds of `work()`, including the GPU work it queued."""
    from teachsweep.training import synchronize

    if device is not None:
        synchronize(device)
    start = time.perf_counter()
    work()
    if device is not None:
        synchronize(device)
    return time.perf_counter() - start


def matmul_peak_gflops(size: int = 2048, repeats: int = 10, device=None, dtype=None) -> float:
    """This machine's (or `device`'s) matrix-product rate in `dtype` (default float32): the best of `repeats`
    square products."""
    import torch

    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # first use: kernel selection, allocation
    return max(2 * size**3 / seconds(lambda: a @ b, a.device) / 1e9 for _ in range(repeats))


def scaffold_cost(steps: int, model_name: str, console: Console, device_name: str = "cpu") -> None:
    """One SMaT iteration (student step + meta step) over one plain student step with the same explanation loss,
    same batches, interleaved, for both unroll points: the paper's look-ahead from the updated student and the
    meta-gradient of the student's own step. The teacher's outputs are precomputed (as the job caches them)."""
    import torch

    from teachsweep import data, models, tasks
    from teachsweep.explain.attention import AttentionExplainer, head_scores
    from teachsweep.jobs import scaffold
    from teachsweep.training import pick_device, synchronize, to_device

    device = pick_device(device_name)
    cfg = scaffold.ScaffoldConfig(explainer="smat", max_length=64)
    task = tasks.load_task("rotten_tomatoes")
    batches = data.make_batches(task, "train", models.load_tokenizer(model_name), cfg.max_length, 256)
    stream = data.train_stream(batches, cfg.batch_size, seed=0)
    teacher = models.build_model(model_name, task, seed=0).to(device).eval().requires_grad_(False)
    student = models.build_model(model_name, task, seed=1).to(device).train()
    layers, heads = scaffold.transformer_shape(student)
    model = scaffold.ExplainedStudent(student, AttentionExplainer(layers, heads)).to(device)
    teacher_explainer = AttentionExplainer(layers, heads).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = scaffold.make_student_optimizer(params, cfg)
    meta_optimizer = torch.optim.AdamW([teacher_explainer.phi], lr=cfg.meta_lr, weight_decay=0.0)
    beta = 5.0

    def draw() -> tuple:
        """A batch, a meta batch and the teacher's outputs on them (precomputed once per example in the job, by
        its TeacherCache: not timed)."""
        host_batch, host_meta = next(stream), next(stream)
        batch, meta_batch = to_device(host_batch, device), to_device(host_meta, device)
        with torch.no_grad():
            t_logits, attentions = teacher.classify(batch, output_attentions=True, log_attention=True)
            evidence = head_scores(attentions, batch["attention_mask"])
            meta_targets = teacher.classify(meta_batch)[0]
        meta = scaffold.MetaBatch(meta_batch, meta_targets, scaffold.words_read(host_batch, host_meta))
        return batch, t_logits, evidence, meta

    def iteration(arm: str, drawn: tuple) -> float:
        batch, t_logits, evidence, meta = drawn
        arm_cfg = cfg.model_copy(update={"meta_unroll": arm if arm != "plain" else "lookahead"})
        meta_args = (meta,) if arm != "plain" else ()
        learner = scaffold.Learner(model, params, optimizer, arm_cfg, beta)
        synchronize(device)
        start = time.perf_counter()
        _, meta = scaffold.student_iteration(
            learner, scaffold.Lesson(batch, t_logits, evidence), teacher_explainer, teacher_explainer, *meta_args
        )
        if meta is not None:
            teacher_explainer.phi.grad = meta.phi_grad
            meta_optimizer.step()
            meta_optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return time.perf_counter() - start

    arms = ("plain", "lookahead", "student_step")
    drawn = draw()
    for arm in arms:  # warm-up
        iteration(arm, drawn)
    flops = {arm: matmul_flops(lambda arm=arm: iteration(arm, drawn)) for arm in arms}
    timings: dict[str, list[float]] = {arm: [] for arm in arms}
    for _ in range(steps):  # every arm on the same batches, interleaved
        drawn = draw()
        for arm in arms:
            timings[arm].append(iteration(arm, drawn))
    plain = statistics.median(timings["plain"])
    table = Table(
        title=f"bench scaffold: {model_name}, batch {cfg.batch_size}, length <= {cfg.max_length}, "
        f"{steps} interleaved iterations, medians, {device}, "
        f"{torch.get_num_threads()} threads"
    )
    for column in ("", "s / iteration", "ratio", "matmul GFLOP", "FLOP ratio"):
        table.add_column(column)
    labels = {
        "plain": "plain student step (CE + beta * explanation KL)",
        "lookahead": "SMaT, meta_unroll=lookahead (paper): step + look-ahead + meta step",
        "student_step": "SMaT, meta_unroll=student_step: differentiable step + meta step",
    }
    for arm in arms:
        median = statistics.median(timings[arm])
        table.add_row(
            labels[arm],
            f"{median:.4f}",
            f"{median / plain:.2f}",
            f"{flops[arm] / 1e9:.1f}",
            f"{flops[arm] / flops['plain']:.2f}",
        )
    console.print(table)
    for arm in arms[1:]:
        console.print(
            f"SMaT iteration ({arm}) / plain student step: "
            f"{statistics.median(timings[arm]) / plain:.2f}x (target <= 3x)"
        )
    console.print(peak_memory())


BERT_BASE_SHAPES = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}


def bert_base_directory(root: Path) -> Path:
    """A local model directory with BERT-base's shapes, random weights and MiniLM's tokenizer (the same uncased
    WordPiece vocabulary): loads like a hub checkpoint (`model: <dir>`), offline. Right for speed, not accuracy."""
    from transformers import AutoTokenizer, BertConfig, BertModel
    from transformers.utils import logging

    from teachsweep import models

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
    from teachsweep import models
    from teachsweep.jobs import teacher
    from teachsweep.training import TaskData, autocast, pick_device, supervised_loss, to_device

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
    import os

    import torch

    from teachsweep.jobs import teacher
    from teachsweep.sweep import init_ray, quiet_libraries
    from teachsweep.training import pick_device, uses_bf16

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


def matmul_flops(work) -> float:
    """Floating-point operations of the matrix products (mm, bmm, addmm, ...) one call of `work` runs, as the
    PyTorch profiler counts them: a hardware-independent cost, what a saturated accelerator's time follows.

    Keep `work` small (one batch, one iteration): to count FLOPs the profiler records input shapes, which holds
    a reference to every op's inputs and outputs until the profile is released, so memory grows with all the
    work profiled, not with what it keeps (pytorch/pytorch#133444)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        work()
    flops = float(sum(event.flops for event in prof.key_averages() if event.flops))
    del prof  # its records hold the tensors: release them now, not when the caller's frame goes
    release_freed_memory()
    return flops


def release_freed_memory() -> None:
    """Hands the heap's freed pages back to the system (glibc keeps them otherwise: after a profile of a few GB,
    this process would stay that large, and the next profile would start from there)."""
    import ctypes
    import gc

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

    def __exit__(self, *exc) -> None:
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


def distributed_cost(steps: int, repeats: int, console: Console) -> None:
    """The same small LoT job in-process, under a 1-worker TorchTrainer and under a 2-worker gloo TorchTrainer,
    each inside a Tune trial: time per teacher step as the job measures it, and the fixed cost (wall time minus
    the steps), which holds the TorchTrainer start-up. Interleaved repeats, the fastest of each arm shown."""
    import ray
    from ray import tune

    from teachsweep import launch, tracking
    from teachsweep.reporter import Reporter
    from teachsweep.sweep import init_ray, quiet_libraries

    quiet_libraries()
    job = OVERHEAD_JOB | {"epochs": 1, "max_eval_examples": 64, "steps_per_epoch": steps}
    arms = [("in-process", 1), ("TorchTrainer", 1), ("TorchTrainer", 2)]
    cases = [arm for _ in range(repeats) for arm in arms]
    init_ray(total_cpus=4)  # two 1-CPU workers plus the trial's token CPU on a 2-core machine
    with ProcessTreePeak() as tree, tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        experiment_id = tracking.ensure_experiment(tracking.client_for(uri), "bench-distributed")

        def trainable(config):
            arm, workers = cases[config["case"]]
            run_id = tracking.client_for(uri).create_run(experiment_id).info.run_id
            start = time.perf_counter()
            if arm == "in-process":
                metrics = launch.run_job("lot", job, Reporter(), cpus=1)
            else:
                metrics = launch.run_distributed(
                    "lot", job, workers, 1, 0, (uri, run_id), f"{tmp}/train", f"bench-{config['case']}"
                )
            tune.report({"wall_s": time.perf_counter() - start, "step_s": metrics["time/teacher_step_s"]})

        grid = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 0.01}),
            param_space={"case": tune.grid_search(list(range(len(cases))))},
            tune_config=tune.TuneConfig(max_concurrent_trials=1),
            run_config=tune.RunConfig(name="bench-distributed", storage_path=tmp, verbose=0),
        ).fit()
        measured: dict[tuple[str, int], list[tuple[float, float]]] = {arm: [] for arm in arms}
        for result in grid:
            measured[cases[result.config["case"]]].append((result.metrics["wall_s"], result.metrics["step_s"]))
        ray.shutdown()

    table = Table(
        title=f"bench distributed: LoT cnn:16 on digits, global batch 64, {steps} teacher steps, best of {repeats}"
    )
    for column in ("arm", "workers", "wall s", "s / teacher step", "fixed s (wall - steps)"):
        table.add_column(column)
    for arm, workers in arms:
        wall, step = min(measured[(arm, workers)])
        table.add_row(arm, str(workers), f"{wall:.1f}", f"{step:.4f}", f"{wall - steps * step:.1f}")
    console.print(table)
    console.print(peak_memory(tree))


def reference_ppo_steps_per_s(config: dict, rollouts: int) -> float:
    """Environment steps per second of a minimal CleanRL-style PPO loop (sample, step, GAE, clipped policy and value
    losses, the approximate KL it logs; nothing else), with lot_rl's network and vectorised envs: the yardstick for
    the job's own teacher-only loop."""
    import torch

    from teachsweep import environments
    from teachsweep.jobs import lot_rl

    cfg = lot_rl.LoTRLConfig.model_validate(config)
    envs = environments.make_vector_env(cfg.task, cfg.num_envs)
    device = torch.device(
        "cuda" if cfg.device == "auto" and torch.cuda.is_available() else "cpu" if cfg.device == "auto" else cfg.device
    )
    agent = lot_rl.build_agent(cfg, envs.single_observation_space.shape, int(envs.single_action_space.n), "teacher")
    agent = agent.to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
    obs, _ = envs.reset(seed=list(range(cfg.num_envs)))
    start = time.perf_counter()
    for _ in range(rollouts):
        stored = []
        with torch.no_grad():
            for _ in range(cfg.num_steps):
                obs_t = torch.as_tensor(obs, device=device)
                logits, value = agent(obs_t)
                dist = torch.distributions.Categorical(logits=logits)
                action = dist.sample()
                obs, reward, terminated, truncated, _ = envs.step(action.cpu().numpy())
                stored.append(
                    (
                        obs_t,
                        action,
                        dist.log_prob(action),
                        value,
                        torch.as_tensor(reward, device=device).float(),
                        torch.as_tensor(terminated | truncated, device=device).float(),
                    )
                )
            last_value = agent(torch.as_tensor(obs, device=device))[1]
        b_obs, b_act, b_logp, b_val, b_rew, b_done = (torch.stack(c) for c in zip(*stored, strict=True))
        advantages, running = torch.zeros_like(b_rew), torch.zeros(cfg.num_envs, device=device)
        for t in reversed(range(cfg.num_steps)):
            next_value = last_value if t == cfg.num_steps - 1 else b_val[t + 1]
            delta = b_rew[t] + cfg.gamma * next_value * (1 - b_done[t]) - b_val[t]
            running = advantages[t] = delta + cfg.gamma * cfg.gae_lambda * (1 - b_done[t]) * running
        returns = (advantages + b_val).flatten()
        b_obs, b_act, b_logp, advantages = b_obs.flatten(0, 1), b_act.flatten(), b_logp.flatten(), advantages.flatten()
        kls = []
        for _ in range(cfg.update_epochs):
            for index in torch.randperm(cfg.rollout_size, device=device).split(cfg.minibatch_size):
                logits, value = agent(b_obs[index])
                dist = torch.distributions.Categorical(logits=logits)
                log_ratio = dist.log_prob(b_act[index]) - b_logp[index]
                ratio = log_ratio.exp()
                adv = (advantages[index] - advantages[index].mean()) / (advantages[index].std() + 1e-8)
                policy = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef)).mean()
                old_value = b_val.flatten()[index]  # clipped value loss, as CleanRL's default
                clipped = old_value + (value - old_value).clamp(-cfg.clip_coef, cfg.clip_coef)
                v_loss = 0.5 * torch.max((value - returns[index]) ** 2, (clipped - returns[index]) ** 2).mean()
                loss = policy + cfg.vf_coef * v_loss - cfg.ent_coef * dist.entropy().mean()
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
                optimizer.step()
                with torch.no_grad():
                    kls.append((ratio - 1 - log_ratio).mean())  # approx KL, logged by CleanRL-style loops
        float(torch.stack(kls).mean())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    envs.close()
    return rollouts * cfg.rollout_size / elapsed


RL_BENCH_JOB = {
    "num_envs": 8,
    "num_steps": 128,
    "num_minibatches": 4,
    "update_epochs": 4,
    "buffer_rollouts": 10,
    "alpha": 0.5,
    "student_steps": 5,
    "temperature": 1.0,
    "epochs": 1,
    "eval_episodes": 1,
    "eval_step_limit": 1,
    "device": "cpu",
    "checkpoint_every": 0,
}


def rl_forward_flops(cfg) -> tuple[float, float]:
    """FLOPs of one minibatch forward of the teacher (policy + value) and of a policy network (a student, or the
    teacher's logits alone)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from teachsweep import environments
    from teachsweep.jobs import lot_rl

    envs = environments.make_vector_env(cfg.task, 1)
    shape, actions = envs.single_observation_space.shape, int(envs.single_action_space.n)
    envs.close()
    teacher = lot_rl.build_agent(cfg, shape, actions, "teacher")
    obs = torch.zeros(cfg.minibatch_size, *shape)
    counts = []
    for forward in (teacher, teacher.logits):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            forward(obs)
        counts.append(float(counter.get_total_flops()))
    return counts[0], counts[1]


def rl_cost(rollouts: int, repeats: int, task: str, console: Console, device: str = "cpu") -> None:
    """(1) Environment steps per second of lot_rl's teacher-only PPO against a minimal PPO loop, same network and
    envs; (2) LoT's time per teacher update against teacher-only, beside the FLOP ideal of what the run did
    (docs/benchmarks.md, the FLOP ideal: a teacher minibatch = 3 units, LoT's joint minibatch = 6, each extra
    student minibatch = 4)."""
    from teachsweep.jobs import lot_rl

    job = RL_BENCH_JOB | {"task": task, "device": device}
    cfg = lot_rl.LoTRLConfig.model_validate(job)
    job["steps_per_epoch"] = rollouts * cfg.rollout_size
    lot_rl.train(job | {"steps_per_epoch": cfg.rollout_size})  # warm-up
    runs: dict[str, list] = {"reference": [], "teacher_only": [], "lot": []}
    for _ in range(repeats):  # interleaved, so that drift in machine speed hits every arm alike
        runs["reference"].append(reference_ppo_steps_per_s(job, rollouts))
        runs["teacher_only"].append(lot_rl.train(job | {"arm": "teacher_only"}))
        runs["lot"].append(lot_rl.train(job | {"arm": "lot"}))
    reference = statistics.median(runs["reference"])
    job_rate = statistics.median(m["time/env_steps_per_s"] for m in runs["teacher_only"])
    title = (
        f"bench rl: {task}, {cfg.num_envs} envs x {cfg.num_steps} steps, {rollouts} rollouts x {repeats} "
        f"repeats (medians), device {device}"
    )
    speed = Table(title=title)
    for column in ("loop", "env steps / s", "ratio to reference"):
        speed.add_column(column)
    speed.add_row("minimal reference PPO", f"{reference:.0f}", "1.00")
    speed.add_row("lot_rl arm=teacher_only", f"{job_rate:.0f}", f"{reference / job_rate:.2f} (time ratio)")
    console.print(speed)

    base = statistics.median(m["time/teacher_update_s"] for m in runs["teacher_only"])
    lot = runs["lot"][0]
    update = statistics.median(m["time/teacher_update_s"] for m in runs["lot"])
    teacher_minibatches = lot["steps/teacher"] / lot["steps/teacher_updates"]
    extra = (lot["steps/student"] - lot["steps/teacher"]) / lot["steps/teacher_updates"]  # beyond the joint steps
    # the units of docs/benchmarks.md weighted by each forward's FLOPs: the students and the teacher's target
    # forward are policy networks without the teacher's value head (for an MLP agent, about half the teacher)
    teacher_fwd, policy_fwd = rl_forward_flops(cfg)
    ideal = (teacher_minibatches * (3 * teacher_fwd + 3 * policy_fwd) + extra * 4 * policy_fwd) / (
        teacher_minibatches * 3 * teacher_fwd
    )
    cost = Table(title=f"LoT (N={cfg.student_steps}, buffer {cfg.buffer_rollouts} rollouts) per teacher update")
    for column in ("arm", "s / teacher update", "ratio to teacher-only", "FLOP ideal", "ratio / ideal"):
        cost.add_column(column)
    cost.add_row("teacher_only", f"{base:.4f}", "1.00", "1.00", "1.00")
    cost.add_row("lot", f"{update:.4f}", f"{update / base:.2f}", f"{ideal:.2f}", f"{update / base / ideal:.2f}")
    cost.caption = (
        f"per update: {teacher_minibatches:.0f} teacher minibatches, {extra:.1f} extra student "
        "minibatches on average (the buffer fills over the first updates)"
    )
    console.print(cost)
    console.print(peak_memory())
