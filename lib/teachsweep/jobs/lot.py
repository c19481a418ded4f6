"""LoT: Learning from Teaching regularisation (Jin, Che et al. 2024), one file, top to bottom.

A teacher learns its task while staying easy to imitate: K students imitate it (KL(T||S), N student updates
per teacher update) and the teacher is pulled towards what the students learned (KL(S||T)):

    L_T = CE(teacher(x), y) + alpha * sum_i lambda_i * KL(S_i || T)      (gradient into the teacher only)
    L_S = [CE(S_i(x), y)]   + alpha * KL(T || S_i)                        (gradient into the student only)

One teacher step = a joint step of teacher and students on one batch, then N-1 student-only steps on an
independent batch stream, with the teacher's forward under no_grad. `arm: teacher_only` trains the teacher
alone (no student is built) for the same number of teacher steps, times `budget_multiplier` when the sweep
matches total model-steps. Works for text and image classification and for language modelling.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, field_validator, model_validator

from teachsweep import data, distributed, models
from teachsweep.reporter import Reporter
from teachsweep.training import (
    OptimizerConfig,
    TaskData,
    autocast,
    evaluate,
    make_optimizer,
    pick_device,
    to_device,
    update,
)

# ---------------------------------------------------------------------------------------------- config


class LoTConfig(OptimizerConfig):
    model_config = ConfigDict(extra="forbid")

    task: str = "rotten_tomatoes"
    teacher: str = "minilm:2"
    student: str | None = None  # default: the teacher's architecture
    arm: Literal["lot", "teacher_only"] = "lot"

    alpha: float = Field(0.5, ge=0)
    student_steps: int = Field(2, ge=1, description="N: student updates per teacher update")
    temperature: float = Field(1.5, gt=0)
    num_students: int = Field(1, ge=1, description="K students in the teacher's regulariser")
    student_weights: list[float] | None = None  # lambda_i; default 1/K each
    student_ce: bool = True  # students also fit the labels (the public code's default `kl_ce`)
    symmetric_kl: bool = False  # teacher term alpha * [KL(S||T) + KL(T||S)]
    detach: bool = True  # each model's distillation target is detached from the other's graph

    batch_size: int = Field(32, ge=1)
    epochs: int = Field(3, ge=1)
    patience: int | None = Field(None, ge=1)  # stop when the teacher's validation score has not improved for this
    # many epochs (training "to convergence"); None: train every epoch
    steps_per_epoch: int | None = Field(None, ge=1)  # teacher steps between evaluations; None = one pass
    budget_multiplier: float = Field(1.0, ge=1)  # teacher-only arm at matched model-steps
    max_train_examples: int | None = Field(None, ge=1)  # LM: tokens of the training text
    max_eval_examples: int | None = Field(None, ge=1)  # per evaluation split; LM: tokens
    eval_batch_size: int = Field(128, ge=1)

    max_length: int = Field(128, ge=8)  # text: tokens per example
    freeze_embeddings: bool = False  # text: keep the token embedding table fixed (speed on CPU)
    text_column: str | None = None  # csv:/hf: tasks
    label_column: str | None = None
    augment_pad: int = Field(0, ge=0)  # images: random-crop padding
    augment_flip: bool = False  # images: horizontal flips (not for digits)
    bptt: int = Field(35, ge=2)  # language modelling: tokens per chunk

    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    checkpoint_every: int = Field(1, ge=0)  # epochs between checkpoints a restarted trial resumes from; 0: none

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        return data.validate_task_name(value)

    @field_validator("teacher", "student")
    @classmethod
    def _known_model(cls, value: str | None) -> str | None:
        return None if value is None else models.validate_model_name(value)

    @model_validator(mode="after")
    def _models_fit_the_task(self) -> LoTConfig:
        data.validate_columns(self.task, self.text_column, self.label_column)
        kind = data.task_kind(self.task)
        for name in (self.teacher, self.student):
            if name is not None and kind is not None:
                models.validate_model_name(name, kind)
        return self

    @model_validator(mode="after")
    def _weights_match_students(self) -> LoTConfig:
        if self.student_weights is not None:
            if len(self.student_weights) != self.num_students:
                raise ValueError("student_weights needs one weight per student (num_students)")
            if any(w < 0 for w in self.student_weights):
                raise ValueError("student_weights must be >= 0")
        return self

    @property
    def lambdas(self) -> list[float]:
        return self.student_weights or [1.0 / self.num_students] * self.num_students

    @property
    def model_steps_per_teacher_step(self) -> int:
        """Forward/backward model updates per teacher step: 1 + N*K for LoT, 1 for the teacher alone."""
        return 1 if self.arm == "teacher_only" else 1 + self.student_steps * self.num_students


# ---------------------------------------------------------------------------------------------- losses


def kl_divergence(target_logits: torch.Tensor, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over rows of KL(softmax(target/T) || softmax(logits/T)).

    Rows are examples (classification) or tokens (language modelling: logits are flattened to (rows, V)).
    Gradient flows into whichever argument is not detached."""
    target_logits = target_logits.reshape(-1, target_logits.size(-1)).float()
    logits = logits.reshape(-1, logits.size(-1)).float()
    log_target = F.log_softmax(target_logits / temperature, dim=-1)
    log_model = F.log_softmax(logits / temperature, dim=-1)
    return F.kl_div(log_model, log_target, reduction="batchmean", log_target=True) * temperature**2


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example (classification) or per token (language modelling)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1))


def teacher_loss(
    teacher_logits: torch.Tensor,
    student_logits: list[torch.Tensor],
    labels: torch.Tensor,
    cfg: LoTConfig,
) -> torch.Tensor:
    """CE + alpha * sum_i lambda_i KL(S_i || T); the students' logits are detached unless cfg.detach is off."""
    loss = task_loss(teacher_logits, labels)
    if not student_logits:  # the teacher-only arm
        return loss
    for weight, s_logits in zip(cfg.lambdas, student_logits, strict=True):
        target = s_logits.detach() if cfg.detach else s_logits
        term = kl_divergence(target, teacher_logits, cfg.temperature)
        if cfg.symmetric_kl:
            term = term + kl_divergence(teacher_logits, target, cfg.temperature)
        loss = loss + cfg.alpha * weight * term
    return loss


def student_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, cfg: LoTConfig
) -> torch.Tensor:
    """[CE] + alpha * KL(T || S); the teacher's logits are detached unless cfg.detach is off."""
    target = teacher_logits.detach() if cfg.detach else teacher_logits
    loss = cfg.alpha * kl_divergence(target, student_logits, cfg.temperature)
    if cfg.student_ce:
        loss = loss + task_loss(student_logits, labels)
    return loss


# ---------------------------------------------------------------------------------------------- training


def train(config: LoTConfig | dict, reporter: Reporter | None = None) -> dict[str, float]:
    cfg = LoTConfig.model_validate(config)
    reporter = reporter or Reporter()
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    task_data = TaskData(cfg, [cfg.teacher, cfg.student])
    if task_data.task.regression:
        raise ValueError(f"task {cfg.task}: LoT's KL term needs classes, and this task has a real-valued target")

    teacher = models.build_model(cfg.teacher, task_data.task, models.init_seed(cfg.seed, "teacher"), cfg.bptt)
    teacher = teacher.to(device).train()
    n_students = cfg.num_students if cfg.arm == "lot" else 0
    students = [
        models.build_model(
            cfg.student or cfg.teacher, task_data.task, models.init_seed(cfg.seed, "student", i), cfg.bptt
        )
        .to(device)
        .train()
        for i in range(n_students)
    ]

    if cfg.freeze_embeddings:
        for model in [teacher, *students]:
            models.freeze_word_embeddings(model)

    # Under DDP every worker draws the same global batches and trains on its shard of each.
    teacher, students = distributed.wrap(teacher), [distributed.wrap(s) for s in students]
    steps_per_epoch = round((cfg.steps_per_epoch or task_data.steps_per_pass()) * cfg.budget_multiplier)
    teacher_total = steps_per_epoch * cfg.epochs
    teacher_opt, teacher_sched = make_optimizer(teacher, cfg, teacher_total)
    student_opts = [make_optimizer(s, cfg, teacher_total * cfg.student_steps) for s in students]

    joint_stream = task_data.stream(cfg.seed)
    student_stream = task_data.stream(cfg.seed + 10_000)  # independent batches for the extra student steps
    # Recurrent states (LSTM) per stream: index 0 is the teacher, 1..K the students.
    joint_state: list = [None] * (1 + n_students)
    extra_state: list = [None] * (1 + n_students)

    teacher_steps = student_steps = 0
    train_seconds = 0.0
    best_val, metrics, first_epoch = None, {}, 1
    at_best: dict[str, float] = {}  # test score and step counts at the best validation epoch
    higher_is_better = not task_data.is_lm
    saved = reporter.restore()
    if saved is not None:  # a restarted trial: continue after the last checkpointed epoch
        distributed.unwrap(teacher).load_state_dict(saved["teacher"])
        teacher_opt.load_state_dict(saved["teacher_opt"])
        teacher_sched.load_state_dict(saved["teacher_sched"])
        for student, (opt, sched), state in zip(students, student_opts, saved["students"], strict=True):
            distributed.unwrap(student).load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
        teacher_steps, student_steps = saved["teacher_steps"], saved["student_steps"]
        train_seconds, best_val, first_epoch = saved["train_seconds"], saved["best_val"], saved["epoch"] + 1
        at_best, metrics = saved.get("at_best", {}), saved.get("metrics", {})
        for _ in range(teacher_steps):  # the streams are deterministic: replay them to where they were
            next(joint_stream)
        for _ in range(student_steps - teacher_steps if students else 0):
            next(student_stream)
    stopped = saved is not None and cfg.patience is not None and saved["epoch"] - at_best["best_epoch"] >= cfg.patience
    for epoch in range(first_epoch, cfg.epochs + 1 if not stopped else first_epoch):  # (restarted after its stop)
        loss_sums = torch.zeros(2, device=device)  # teacher, students: checked for NaN once per epoch
        epoch_start = time.perf_counter()
        for _ in range(steps_per_epoch):
            batch = to_device(distributed.shard(next(joint_stream)), device)
            with autocast(device, cfg.precision):
                t_logits, joint_state[0] = teacher(batch, joint_state[0])
                s_logits = []
                for i, student in enumerate(students):
                    logits, joint_state[i + 1] = student(batch, joint_state[i + 1])
                    s_logits.append(logits)
                loss_t = teacher_loss(t_logits, s_logits, batch["labels"], cfg)
                loss_s = sum(
                    (student_loss(logits, t_logits, batch["labels"], cfg) for logits in s_logits),
                    torch.zeros((), device=device),
                )
            # One backward for all models: with detached targets the losses touch disjoint parameters.
            (loss_t + loss_s).backward()
            update(teacher, teacher_opt, teacher_sched, cfg.clip_grad_norm)
            for student, (opt, sched) in zip(students, student_opts, strict=True):
                update(student, opt, sched, cfg.clip_grad_norm)
            loss_sums += torch.stack([loss_t.detach(), loss_s.detach()])
            teacher_steps += 1
            student_steps += 1 if students else 0

            for _ in range(cfg.student_steps - 1 if students else 0):
                batch = to_device(distributed.shard(next(student_stream)), device)
                with autocast(device, cfg.precision):
                    with torch.no_grad():  # the teacher only provides targets here: no graph
                        t_logits, extra_state[0] = distributed.unwrap(teacher)(batch, extra_state[0])
                    for i, (student, (opt, sched)) in enumerate(zip(students, student_opts, strict=True)):
                        logits, extra_state[i + 1] = student(batch, extra_state[i + 1])
                        loss = student_loss(logits, t_logits, batch["labels"], cfg)
                        loss.backward()
                        update(student, opt, sched, cfg.clip_grad_norm)
                student_steps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_seconds += time.perf_counter() - epoch_start
        if not torch.isfinite(loss_sums).all():
            raise FloatingPointError(f"loss is not finite in epoch {epoch} (teacher, students: {loss_sums.tolist()})")

        metrics = evaluate_all(
            distributed.unwrap(teacher), [distributed.unwrap(s) for s in students], task_data, device, cfg.precision
        )
        world = distributed.world()[1]
        loss_teacher, loss_student = distributed.all_sum(loss_sums.tolist(), device)
        metrics |= {
            "loss/teacher": loss_teacher / world / steps_per_epoch,
            "loss/student": loss_student / world / steps_per_epoch / max(1, n_students),
            "steps/teacher": teacher_steps,
            "steps/student": student_steps,
            "steps/model": teacher_steps + student_steps * n_students,
            "time/teacher_step_s": train_seconds / teacher_steps,
            "time/train_s": train_seconds,
        }
        key = "teacher/val_ppl" if task_data.is_lm else "teacher/val_acc"
        if best_val is None or (metrics[key] > best_val if higher_is_better else metrics[key] < best_val):
            best_val = metrics[key]
            test_key = key.replace("/val_", "/test_")
            at_best = {
                f"{test_key}_at_best_val": metrics[test_key],
                "steps/teacher_at_best_val": teacher_steps,
                "steps/model_at_best_val": metrics["steps/model"],
                "best_epoch": epoch,
            }
        metrics[key.replace("teacher/", "teacher/best_")] = best_val
        metrics |= at_best
        checkpoint = None
        if cfg.checkpoint_every and (epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs):
            counters = {"epoch": epoch, "teacher_steps": teacher_steps, "student_steps": student_steps,
                        "train_seconds": train_seconds, "best_val": best_val, "at_best": at_best,
                        "metrics": metrics}  # fmt: skip
            checkpoint = counters | training_state(teacher, (teacher_opt, teacher_sched), students, student_opts)
        if saved is not None:
            metrics["trial/resumed_from_epoch"] = saved["epoch"]
        reporter.report(metrics, epoch, checkpoint=checkpoint)
        if cfg.patience is not None and epoch - at_best["best_epoch"] >= cfg.patience:
            break
    return metrics


def training_state(teacher, teacher_opt, students, student_opts) -> dict:
    """Every model, optimizer and schedule state a restarted trial needs (tensors and numbers only)."""
    return {
        "teacher": distributed.unwrap(teacher).state_dict(),
        "teacher_opt": teacher_opt[0].state_dict(),
        "teacher_sched": teacher_opt[1].state_dict(),
        "students": [
            {"model": distributed.unwrap(s).state_dict(), "opt": o.state_dict(), "sched": c.state_dict()}
            for s, (o, c) in zip(students, student_opts, strict=True)
        ],
    }


def evaluate_all(teacher, students, task_data: TaskData, device, precision) -> dict[str, float]:
    """Teacher and student quality on validation and test; students' agreement with the teacher."""
    metric = "ppl" if task_data.is_lm else "acc"
    out: dict[str, float] = {}
    for split, short in (("validation", "val"), ("test", "test")):
        value, t_pred = evaluate(teacher, task_data.eval_stream(split), device, precision)
        out[f"teacher/{short}_{metric}"] = value
        values, agreements = [], []
        for i, student in enumerate(students):
            s_value, s_pred = evaluate(student, task_data.eval_stream(split), device, precision)
            values.append(s_value)
            if len(students) > 1:
                out[f"student{i}/{short}_{metric}"] = s_value
            if len(s_pred):
                same, total = distributed.all_sum([(s_pred == t_pred).sum().item(), len(s_pred)], device)
                agreements.append(same / total)
        if values:
            out[f"student/{short}_{metric}"] = sum(values) / len(values)
        if agreements:
            out[f"agreement/{short}"] = sum(agreements) / len(agreements)
    return out
