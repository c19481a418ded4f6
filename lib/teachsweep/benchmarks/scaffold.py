"""`teachsweep bench scaffold`: one SMaT iteration (student step + meta step) over one plain student step."""

from __future__ import annotations

import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from teachsweep import data, models, tasks
from teachsweep.benchmarks.measure import matmul_flops, peak_memory
from teachsweep.explain.attention import AttentionExplainer, head_scores
from teachsweep.jobs import scaffold
from teachsweep.training import pick_device, synchronize, to_device


def scaffold_cost(steps: int, model_name: str, console: Console, device_name: str = "cpu") -> None:
    """One SMaT iteration (student step + meta step) over one plain student step with the same explanation loss,
    same batches, interleaved, for both unroll points: the paper's look-ahead from the updated student and the
    meta-gradient of the student's own step. The teacher's outputs are precomputed (as the job caches them)."""
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
