"""Teacher job: fine-tune a classifier on gold labels, early stopping on validation accuracy, and keep the best
checkpoint in a registry keyed by the config, so that many student trials reuse one teacher.

Registry: <cache>/teachers/<hash of the config>/{model.pt, config.json, metrics.json}; `model.pt` is a
state_dict loaded with `weights_only=True`. A sweep names a teacher by its config (trained once, on first use,
under a file lock), by a checkpoint directory, or by the MLflow run that logged it."""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from torch import nn

from teachsweep import distributed, layout, models, packing, tasks, training
from teachsweep.jobs import JobSpec
from teachsweep.reporter import PackReporter, Reporter
from teachsweep.validation import checks_files


class TeacherConfig(training.DataConfig, training.OptimizerConfig):
    model_config = ConfigDict(extra="forbid")

    model: str = "minilm:2"
    epochs: int = Field(5, ge=1)
    patience: int = Field(5, ge=1)

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str, info: ValidationInfo) -> str:
        return models.validate_model_name(value, check_files=checks_files(info))

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
    return layout.cache_dir() / "teachers" / cfg.key()


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


PACK_VARIES = frozenset({"seed", "lr", "momentum", "weight_decay", "clip_grad_norm", "patience"})


def check_pack(cfg: TeacherConfig) -> None:
    """What a packed teacher trial cannot train, named by its field."""
    if tasks.task_kind(cfg.task) == "lm":
        raise ValueError(f"task: {cfg.task} is language modelling, which does not pack yet: set resources.pack to 1")


@dataclass
class BestEpoch:
    """A member's best validation epoch so far: its (signed) score, the epoch and the weights there."""

    score: float = -math.inf
    epoch: int = 0
    state: dict[str, torch.Tensor] | None = None


def train_pack(configs: list[TeacherConfig | dict], pack: PackReporter | None = None) -> dict[int, dict[str, float]]:
    """`train` for P configs that differ only in `PACK_VARIES` (packing.py): each member's reports, saved teacher
    and registry entry are its unpacked twin's. A member out of patience leaves the pack at that epoch; one whose
    loss goes NaN fails alone. Returns each finished member's final metrics, by member index."""
    cfgs = [TeacherConfig.model_validate(c) for c in configs]
    pack = pack or PackReporter([Reporter() for _ in cfgs])
    packing.check_members_share(cfgs, PACK_VARIES)
    lead = cfgs[0]
    check_pack(lead)
    device = training.pick_device(lead.device)
    task_data = training.TaskData(lead, [lead.model])
    if task_data.task.regression or task_data.is_lm:
        raise ValueError(f"task {lead.task}: a packed teacher trains a classifier")
    members = []
    for cfg in cfgs:
        model = models.build_model(lead.model, task_data.task, models.init_seed(cfg.seed, "teacher"), lead.bptt)
        model = models.use_fast_attention(model).to(device).train()
        if lead.freeze_embeddings:
            models.freeze_word_embeddings(model)
        members.append(model)
    model = packing.StackedModel(members)
    template = copy.deepcopy(members[0]).cpu()  # scores a member's best weights at its end, as its twin's model
    steps = lead.steps_per_epoch or task_data.steps_per_pass()
    optimizer = packing.StackedOptimizer(
        model.trainable(),
        lead.optimizer,
        lr=packing.member_column([c.lr for c in cfgs], device, torch.float64),
        weight_decay=packing.member_column([c.weight_decay for c in cfgs], device, torch.float64),
        momentum=packing.member_column([c.momentum for c in cfgs], device, torch.float64),
        clip=packing.member_column([c.clip_grad_norm for c in cfgs], device),
        nesterov=lead.nesterov,
        lr_factor=training.schedule_factor(lead.schedule, steps * lead.epochs),
    )
    streams = {cfg.seed: task_data.stream(cfg.seed) for cfg in cfgs}
    active, best, finals = list(range(len(cfgs))), [BestEpoch() for _ in cfgs], {}
    last: dict[int, dict[str, float]] = {}  # each member's last epoch's metrics (a member ASHA stops ends there)

    def finish(member: int, metrics: dict[str, float], epoch: int) -> None:
        """As the twin ends: its best-validation weights scored on the test split, reported, saved."""
        twin = copy.deepcopy(template).to(device)  # (building one would reseed the generator the others draw from)
        twin.load_state_dict(best[member].state)
        test_acc, _ = training.evaluate(twin, task_data.eval_stream("test"), device, lead.precision)
        finals[member] = metrics | {"teacher/test_acc": test_acc, "teacher/best_epoch": best[member].epoch}
        pack.members[member].report(finals[member], epoch)
        save(cfgs[member], best[member].state, finals[member])
        pack.members[member].log_teacher(best[member].state, cfgs[member].model_dump())

    for epoch in range(1, lead.epochs + 1):
        training.synchronize(device)
        started = time.perf_counter()
        for _ in range(steps):
            drawn = {seed: next(streams[seed]) for seed in dict.fromkeys(cfgs[m].seed for m in active)}
            batch = packing.stack_batches([drawn[cfgs[m].seed] for m in active], device)
            with training.autocast(device, lead.precision):
                loss = packing.member_cross_entropy(model(batch), batch["labels"])
            loss.sum().backward()  # members' parameters are disjoint slices: one backward for all
            optimizer.step()
            optimizer.zero_grad()
        training.synchronize(device)
        step_seconds = (time.perf_counter() - started) / steps
        finite = torch.isfinite(loss.detach()).tolist()  # the twin checks its last step's loss
        for position, member in enumerate(active):
            if not finite[position]:
                pack.fail(member, FloatingPointError(f"teacher loss is not finite in epoch {epoch}"))
        going_on = [position for position, ok in enumerate(finite) if ok]
        if len(going_on) < len(active):
            packing.leave([model], [optimizer], going_on)
            active, loss = [active[p] for p in going_on], loss[going_on]
            if not active:
                break
        val_acc, _ = packing.evaluate_pack(model, task_data.eval_stream("validation"), device, lead.precision)
        results = {}
        for position, member in enumerate(active):
            if val_acc[position] > best[member].score:
                state = {name: tensor.cpu() for name, tensor in model.member_state(position).items()}
                best[member] = BestEpoch(val_acc[position], epoch, state)
            results[member] = {
                "teacher/val_acc": val_acc[position],
                "teacher/best_val_acc": best[member].score,
                "teacher/loss": loss[position].item(),
                "time/step_s": step_seconds,
                **task_data.examples(),
            }
        last |= results
        stopped = pack.early_stops(epoch, results)  # ASHA's rule: no teacher saved, as a stopped trial saves none
        pack.report(epoch, results)
        ending = {m for m in active if epoch - best[m].epoch >= cfgs[m].patience or epoch == lead.epochs} - stopped
        for member in active:
            if member in ending:
                finish(member, results[member], epoch)
        going_on = [p for p, m in enumerate(active) if m not in stopped | ending]
        if len(going_on) < len(active):
            packing.leave([model], [optimizer], going_on)
            active = [active[p] for p in going_on]
        if not active:
            break
    return {m: finals.get(m, last[m]) for m in last if m not in pack.failed}


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
    train_pack=train_pack,
    pack_varies=PACK_VARIES,
    check_pack=check_pack,
)
