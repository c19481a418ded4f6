"""Teacher job: fine-tune a classifier on gold labels, early stopping on validation accuracy, and keep the best
checkpoint in a registry keyed by the config, so that many student trials reuse one teacher.

Registry: <cache>/teachers/<hash of the config>/{model.pt, config.json, metrics.json}; `model.pt` is a
state_dict loaded with `weights_only=True`. A sweep names a teacher by its config (trained once, on first use,
under a file lock), by a checkpoint directory, or by the MLflow run that logged it."""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from torch import nn

from teachsweep import data, distributed, models, tasks, training
from teachsweep.jobs import JobSpec
from teachsweep.reporter import Reporter


class TeacherConfig(training.DataConfig, training.OptimizerConfig):
    model_config = ConfigDict(extra="forbid")

    model: str = "minilm:2"
    epochs: int = Field(5, ge=1)
    patience: int = Field(5, ge=1)

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str, info: ValidationInfo) -> str:
        return models.validate_model_name(value, check_files=training.checks_files(info))

    def key(self) -> str:
        # The version changes whenever the same config would train a different teacher (v2: derived init seeds,
        # perplexity minimised for language models).
        fields = self.model_dump(exclude={"device", "precision"}) | {"registry_version": 2}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


class TeacherReference(BaseModel):
    """A config mixin for jobs that take a frozen teacher: its config, a checkpoint directory, or mlflow:<run_id>
    (resolved by the sweep layer, see teachsweep.references)."""

    model_config = ConfigDict(extra="forbid")

    teacher: dict | str = Field(default_factory=dict)

    @field_validator("teacher", mode="before")
    @classmethod
    def _valid_teacher(cls, value: Any, info: ValidationInfo) -> dict | str:
        if isinstance(value, str):
            return value
        if not isinstance(value, dict):
            raise ValueError(
                f"a teacher config (a mapping), a checkpoint directory, mlflow:<run id> or "
                f"sweep:<name>[/<trial>|/each] (got {value!r})"
            )
        # the fields as validated (`lr: "inf"` becomes a float), so the spec's non-finite check sees them
        return TeacherConfig.model_validate(value, context=info.context).model_dump(include=set(value))


def score_names(task: str) -> dict[str, str]:
    """The validation/test score of a task and its direction: accuracy, Pearson r (a csv task may have a float
    target), or perplexity; both classification scores when the kind is known only once loaded."""
    kind = tasks.task_kind(task)
    if kind == "lm":
        return {"ppl": "min"}
    if kind is None or task.startswith("csv:"):
        return {"acc": "max", "pearson": "max", **({"ppl": "min"} if kind is None else {})}
    return {"acc": "max"}


def metrics(cfg: TeacherConfig) -> dict[str, str | None]:
    out: dict[str, str | None] = {
        "teacher/loss": "min",
        "teacher/best_epoch": None,
        "examples/val": None,
        "examples/test": None,
        "time/step_s": "min",
    }
    for score, mode in score_names(cfg.task).items():
        out |= {f"teacher/{split}_{score}": mode for split in ("val", "best_val", "test")}
    return out


def registry_dir(cfg: TeacherConfig) -> Path:
    return data.cache_dir() / "teachers" / cfg.key()


def train(config: TeacherConfig | dict, reporter: Reporter | None = None) -> dict[str, float]:
    """Fine-tune, keep the best validation epoch, save it to the registry and hand it to the reporter (the sweep
    logs it as the trial's teacher artifact)."""
    cfg = TeacherConfig.model_validate(config)
    reporter = reporter or Reporter()
    device = training.pick_device(cfg.device)
    task_data = training.TaskData(cfg, [cfg.model])
    model = models.build_model(cfg.model, task_data.task, models.init_seed(cfg.seed, "teacher"), cfg.bptt)
    model = models.use_fast_attention(model).to(device).train()  # (training never reads attention weights)
    if cfg.freeze_embeddings:
        models.freeze_word_embeddings(model)
    model = distributed.wrap(model)  # under DDP: every worker draws the same global batch and trains on its shard
    steps = cfg.steps_per_epoch or task_data.steps_per_pass()
    optimizer, scheduler = training.make_optimizer(model, cfg, steps * cfg.epochs)
    stream = task_data.stream(cfg.seed)

    # The validation score early stopping follows, and its direction (perplexity is minimised).
    score = "ppl" if task_data.is_lm else "pearson" if task_data.task.regression else "acc"
    sign = -1.0 if task_data.is_lm else 1.0
    best_score, best_state, best_epoch, metrics = -math.inf, None, 0, {}
    for epoch in range(1, cfg.epochs + 1):
        training.synchronize(device)
        started = time.perf_counter()
        for _ in range(steps):
            batch = training.to_device(distributed.shard(next(stream)), device)
            with training.autocast(device, cfg.precision):
                logits, _ = model(batch)
                loss = training.supervised_loss(logits, batch["labels"])
            loss.backward()
            training.update(model, optimizer, scheduler, cfg.clip_grad_norm)
        training.synchronize(device)
        step_seconds = (time.perf_counter() - started) / steps  # this epoch's: the first one's includes warm-up
        if not torch.isfinite(loss):
            raise FloatingPointError(f"teacher loss is not finite in epoch {epoch}")
        val_score, _ = training.evaluate(
            distributed.unwrap(model), task_data.eval_stream("validation"), device, cfg.precision
        )
        if sign * val_score > best_score:
            best_score, best_epoch = sign * val_score, epoch
            best_state = {k: v.detach().cpu().clone() for k, v in distributed.unwrap(model).state_dict().items()}
        metrics = {
            f"teacher/val_{score}": val_score,
            f"teacher/best_val_{score}": sign * best_score,
            "teacher/loss": loss.item(),
            "time/step_s": step_seconds,
            **task_data.examples(),
        }
        reporter.report(metrics, epoch)
        if epoch - best_epoch >= cfg.patience:
            break
    model = distributed.unwrap(model)
    model.load_state_dict(best_state)
    test_score, _ = training.evaluate(model, task_data.eval_stream("test"), device, cfg.precision)
    metrics |= {f"teacher/test_{score}": test_score, "teacher/best_epoch": best_epoch}
    reporter.report(metrics, epoch)
    if distributed.world()[0] == 0:
        save(cfg, best_state, metrics)
        reporter.log_teacher(best_state, cfg.model_dump())
    return metrics


def save(cfg: TeacherConfig, state: dict, metrics: dict) -> Path:
    directory = registry_dir(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"model.pt.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"  # concurrent writers never share it
    torch.save(state, tmp)
    tmp.replace(directory / "model.pt")
    (directory / "config.json").write_text(cfg.model_dump_json(indent=1))
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return directory


def load_checkpoint(directory: Path, device: torch.device) -> tuple[nn.Module, TeacherConfig]:
    cfg = TeacherConfig.model_validate_json((Path(directory) / "config.json").read_text())
    task = tasks.load_task(cfg.task, cfg.text_column, cfg.label_column)
    model = models.build_model(cfg.model, task, cfg.seed, cfg.bptt)
    model.load_state_dict(torch.load(Path(directory) / "model.pt", map_location="cpu", weights_only=True))
    return model.to(device).eval().requires_grad_(False), cfg


def resolve(teacher: dict | str, device: torch.device):
    """A frozen teacher from a config (trained once into the registry) or a checkpoint directory (the sweep layer
    turns `mlflow:<run_id>` references into one before the job runs: see teachsweep.references)."""
    if isinstance(teacher, str):
        return load_checkpoint(Path(teacher), device)
    cfg = TeacherConfig.model_validate(teacher)
    directory = registry_dir(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:  # concurrent trials: one trains, the others wait and reuse
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / "model.pt").exists():
            with distributed.alone():  # under DDP the first worker here trains it for all; the others wait
                train(cfg)
        fcntl.flock(lock, fcntl.LOCK_UN)
    return load_checkpoint(directory, device)


JOB = JobSpec(
    config=TeacherConfig,
    train=train,
    metrics=metrics,
    objective=("teacher/best_val_acc", "max"),
    scores=("teacher/test_acc", "teacher/test_pearson", "teacher/test_ppl"),
    saves_teacher=True,  # the best-validation teacher, as model.pt + config.json of the trial's run
    saved_teacher_scores=("teacher/test_acc", "teacher/test_pearson", "teacher/test_ppl"),
)
