"""`teachsweep bench scaffold`: one SMaT iteration (student step + meta step) over one plain student step, on the
job's own run state (scaffold.setup), lessons and explainer step."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from teachsweep import models, tasks
from teachsweep.benchmarks.measure import matmul_flops, peak_memory
from teachsweep.jobs import scaffold
from teachsweep.jobs.teacher import TeacherConfig
from teachsweep.training import synchronize

ARMS = {
    "plain": "plain student step (CE + beta * explanation KL)",
    "lookahead": "SMaT, meta_unroll=lookahead (paper): step + look-ahead + meta step",
    "student_step": "SMaT, meta_unroll=student_step: differentiable step + meta step",
}


def initialised_teacher(directory: Path, model_name: str) -> Path:
    """A teacher checkpoint directory (model.pt, config.json) holding `model_name` as initialised for
    rotten_tomatoes, which the job loads as it loads any saved teacher: an iteration's cost does not depend on the
    teacher's weights, so none is trained."""
    cfg = TeacherConfig(task="rotten_tomatoes", model=model_name)
    model = models.build_model(cfg.model, tasks.load_task(cfg.task), cfg.seed, cfg.bptt)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / "model.pt")
    (directory / "config.json").write_text(cfg.model_dump_json(indent=1))
    return directory


def scaffold_cost(steps: int, model_name: str, console: Console, device_name: str = "cpu") -> None:
    """One SMaT iteration (student step + meta step) over one plain student step with the same explanation loss,
    same batches, interleaved, for both unroll points: the paper's look-ahead from the updated student and the
    meta-gradient of the student's own step. The run is the job's own (scaffold.setup: teacher, explainers,
    student, optimizers, streams), as are its lessons, whose teacher outputs the job caches once (not timed),
    and its explainer step."""
    with tempfile.TemporaryDirectory() as tmp:
        teacher = initialised_teacher(Path(tmp) / "teacher", model_name)
        cfg = scaffold.ScaffoldConfig(
            teacher=str(teacher),
            explainer="smat",
            max_length=64,
            num_train_examples=256,
            max_eval_examples=256,
            device=device_name,
        )
        run = scaffold.setup(cfg)
    learners = {
        arm: run.learner._replace(cfg=cfg.model_copy(update={"meta_unroll": "lookahead" if arm == "plain" else arm}))
        for arm in ARMS
    }

    def iteration(arm: str, lesson: scaffold.Lesson, meta: scaffold.MetaBatch) -> float:
        synchronize(run.device)
        start = time.perf_counter()
        _, step = scaffold.student_iteration(
            learners[arm], lesson, run.teacher_explainer, run.teacher_scores, None if arm == "plain" else meta
        )
        if step is not None:
            scaffold.step_explainer(run, step)
        synchronize(run.device)
        return time.perf_counter() - start

    drawn = scaffold.next_lesson(run)
    for arm in ARMS:  # warm-up
        iteration(arm, *drawn)
    flops = {arm: matmul_flops(lambda arm=arm: iteration(arm, *drawn)) for arm in ARMS}
    timings: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for _ in range(steps):  # every arm on the same batches, interleaved
        drawn = scaffold.next_lesson(run)
        for arm in ARMS:
            timings[arm].append(iteration(arm, *drawn))
    plain = statistics.median(timings["plain"])
    table = Table(
        title=f"bench scaffold: {model_name}, batch {cfg.batch_size}, length <= {cfg.max_length}, "
        f"{steps} interleaved iterations, medians, {run.device}, "
        f"{torch.get_num_threads()} threads"
    )
    for column in ("", "s / iteration", "ratio", "matmul GFLOP", "FLOP ratio"):
        table.add_column(column)
    for arm, label in ARMS.items():
        median = statistics.median(timings[arm])
        table.add_row(
            label,
            f"{median:.4f}",
            f"{median / plain:.2f}",
            f"{flops[arm] / 1e9:.1f}",
            f"{flops[arm] / flops['plain']:.2f}",
        )
    console.print(table)
    for arm in list(ARMS)[1:]:
        console.print(
            f"SMaT iteration ({arm}) / plain student step: "
            f"{statistics.median(timings[arm]) / plain:.2f}x (target <= 3x)"
        )
    console.print(peak_memory())
