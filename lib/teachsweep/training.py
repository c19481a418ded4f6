"""Training helpers shared by the jobs: device and precision, optimizers, batches of a task, evaluation."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from torch import nn

from teachsweep import data, distributed, models, tasks
from teachsweep.validation import checks_files


def pick_device(name: str) -> torch.device:
    """`auto`: CUDA when this process may use a GPU, else the CPU. A sweep trial that reserved no GPU gets
    `device: cpu` from the trial layer (Ray no longer hides the node's GPUs from it)."""
    device = torch.device(name if name != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (what bf16 autocast leaves)
        torch.backends.cudnn.allow_tf32 = True
    return device


def native_bf16(capability: tuple[int, int]) -> bool:
    """bf16 tensor cores exist from compute capability 8.0 (A100, H100, L4...); V100 and T4 only emulate it."""
    return tuple(capability) >= (8, 0)


def uses_bf16(device: torch.device, precision: str) -> bool:
    if precision == "bf16":
        return True
    return precision == "auto" and device.type == "cuda" and native_bf16(torch.cuda.get_device_capability(device))


def autocast(device: torch.device, precision: str):
    if not uses_bf16(device, precision):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock timing measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RunConfig(BaseModel):
    """The seed, device and precision of the jobs that train (lot, lot_rl, teacher): a config mixin."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"


class DataConfig(RunConfig):
    """The task and batching fields of the jobs that train on a task (lot, teacher): a config mixin."""

    model_config = ConfigDict(extra="forbid")

    task: str = "rotten_tomatoes"
    batch_size: int = Field(32, ge=1)
    steps_per_epoch: int | None = Field(None, ge=1)  # steps between evaluations; None = one pass
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

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str, info: ValidationInfo) -> str:
        return tasks.validate_task_name(value, check_files=checks_files(info))

    @model_validator(mode="after")
    def _columns_exist(self, info: ValidationInfo):
        tasks.validate_columns(self.task, self.text_column, self.label_column, check_files=checks_files(info))
        return self


class OptimizerConfig(BaseModel):
    """The optimizer fields shared by job configs (teacher and students use the same optimizer and lr)."""

    model_config = ConfigDict(extra="forbid")

    optimizer: Literal["sgd", "adamw", "adam"] = "adamw"
    lr: float = Field(5e-5, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.01, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    clip_grad_norm: float | None = Field(1.0, gt=0)


def make_optimizer(model: nn.Module, cfg, total_steps: int):
    """The config's optimizer (sgd | adamw | adam with lr, momentum, nesterov, weight_decay) and schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule_factor(cfg.schedule, total_steps))


def schedule_factor(schedule: str, total_steps: int) -> Callable[[int], float]:
    """The learning rate's factor at each step: 1 (`constant`), or a cosine from 1 to 0 over `total_steps`."""
    if schedule == "cosine":
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    return lambda step: 1.0


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch on `device`; to a GPU from pinned memory, so the copy overlaps the computation."""
    if device.type == "cuda":
        return {
            k: (v.pin_memory() if v.device.type == "cpu" else v).to(device, non_blocking=True) for k, v in batch.items()
        }
    return {k: v.to(device) for k, v in batch.items()}


def state_of(stateful: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's training state: each model's, optimizer's or schedule's state_dict, by key (None skipped)."""
    return {key: obj.state_dict() for key, obj in stateful.items() if obj is not None}


def restore_into(saved: dict[str, Any], stateful: dict[str, Any]) -> None:
    """Resume a restarted trial: load each saved state_dict into the object of the same key (the other way
    round from `state_of`; every job that checkpoints uses the pair)."""
    for key, obj in stateful.items():
        if obj is not None:
            obj.load_state_dict(saved[key])


def replay(stream: Iterator, steps: int) -> None:
    """Advance a deterministic batch stream to where a checkpointed run had taken it."""
    for _ in range(steps):
        next(stream)


def update(model: nn.Module, optimizer, scheduler, clip: float | None) -> None:
    if clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


class TaskData:
    """Train streams and evaluation splits of one task, shaped for the given models (which share a tokenizer).

    `cfg` provides task, text_column, label_column, batch_size, max_length, max_train_examples,
    max_eval_examples, eval_batch_size, bptt, augment_pad and augment_flip."""

    def __init__(self, cfg, model_names: list[str | None]):
        self.cfg = cfg
        self.task = tasks.load_task(cfg.task, cfg.text_column, cfg.label_column)
        self.is_lm = self.task.kind == "lm"
        names = [n for n in model_names if n]
        tokenizer = models.load_tokenizer(names[0]) if self.task.kind == "text" else None
        if tokenizer is not None and any(models.load_tokenizer(n).vocab != tokenizer.vocab for n in names[1:]):
            raise ValueError("teacher and student must share a tokenizer (they must see the same inputs)")
        self.tokenizer = tokenizer
        if self.is_lm:
            self.train_tokens = self.task.splits["train"].tokens[: cfg.max_train_examples]
            self.eval_tokens = {s: self.task.splits[s].tokens[: cfg.max_eval_examples] for s in ("validation", "test")}
        else:
            split = lambda s, n: data.make_batches(self.task, s, tokenizer, cfg.max_length, n)  # noqa: E731
            self.train = split("train", cfg.max_train_examples)
            self.eval = {s: split(s, cfg.max_eval_examples) for s in ("validation", "test")}

    def examples(self) -> dict[str, float]:
        """`examples/val` and `examples/test`: how many examples each evaluation split scores (what an accuracy's
        interval needs); empty for language modelling and regression, whose scores are not proportions."""
        if self.is_lm or self.task.regression:
            return {}
        return {
            f"examples/{short}": float(len(self.eval[split].split))
            for split, short in (("validation", "val"), ("test", "test"))
        }

    def steps_per_pass(self) -> int:
        if self.is_lm:
            return max(1, (len(self.train_tokens) // self.cfg.batch_size - 1) // self.cfg.bptt)
        return max(1, len(self.train.split) // self.cfg.batch_size)

    def stream(self, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        cfg = self.cfg
        if self.is_lm:
            start = torch.randint(0, 1 << 30, (1,), generator=torch.Generator().manual_seed(seed)).item()
            return data.lm_stream(self.train_tokens, cfg.batch_size, cfg.bptt, start=start)
        return data.train_stream(self.train, cfg.batch_size, seed, cfg.augment_pad, cfg.augment_flip)

    def eval_stream(self, split: str) -> Iterator[dict[str, torch.Tensor]]:
        if self.is_lm:
            return data.lm_stream(self.eval_tokens[split], 10, self.cfg.bptt, endless=False)
        return data.eval_batches(self.eval[split], self.cfg.eval_batch_size)


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on classes (per token for a language model), or mean squared error when the model has one
    output (a regression task)."""
    if logits.size(-1) == 1:
        return F.mse_loss(logits.float().squeeze(-1), labels.float())
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten())


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two 1-d series (0 when either is constant)."""
    x, y = x.double().flatten(), y.double().flatten()
    x, y = x - x.mean(), y - y.mean()
    denominator = (x.norm() * y.norm()).item()
    return (x @ y).item() / denominator if denominator > 0 else 0.0


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterator[dict], device, precision) -> tuple[float, torch.Tensor]:
    """(accuracy, this worker's predictions) for classifiers; (Pearson correlation with the targets, all
    predictions) for regression; (perplexity, empty) for language models.
    Under DDP each worker evaluates its shard of every batch and the totals are summed over workers."""
    model.eval()
    # totals and predictions stay on the device, read once at the end: no host sync per batch
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    count, state, predictions, targets = 0, None, [], []
    for batch in batches:
        batch = to_device(distributed.shard(batch), device)
        with autocast(device, precision):
            logits, state = model(batch, state)
        labels = batch["labels"]
        if logits.dim() == 2 and logits.size(-1) == 1:
            predictions.append(logits.float().squeeze(-1))
            targets.append(labels)
            continue
        if logits.dim() == 3:
            total_loss += F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")
        else:
            predictions.append(logits.argmax(-1))
            correct += (predictions[-1] == labels).sum()
        count += labels.numel()
    model.train()
    if targets:
        outputs = distributed.gather(torch.cat(predictions).cpu())
        return pearson(outputs, distributed.gather(torch.cat(targets).cpu())), outputs
    total_loss, correct, count = distributed.all_sum([total_loss.item(), correct.item(), count], device)
    if predictions:
        return correct / count, torch.cat(predictions).cpu()
    return math.exp(min(total_loss / count, 50.0)), torch.empty(0)
