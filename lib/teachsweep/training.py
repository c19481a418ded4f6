"""Training helpers shared by the jobs: device and precision, optimizers, batches of a task, evaluation."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from teachsweep import data, distributed, models


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


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
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )  # fmt: skip
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
        )
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return opt, sched


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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
        self.task = data.load_task(cfg.task, cfg.text_column, cfg.label_column)
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
    total_loss, correct, count, state, predictions, targets = 0.0, 0, 0, None, [], []
    for batch in batches:
        batch = to_device(distributed.shard(batch), device)
        with autocast(device, precision):
            logits, state = model(batch, state)
        labels = batch["labels"]
        if logits.dim() == 2 and logits.size(-1) == 1:
            predictions.append(logits.float().squeeze(-1).cpu())
            targets.append(labels.cpu())
            continue
        if logits.dim() == 3:
            total_loss += F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum").item()
        else:
            predictions.append(logits.argmax(-1).cpu())
            correct += (predictions[-1] == labels.cpu()).sum().item()
        count += labels.numel()
    model.train()
    if targets:
        outputs, gold = distributed.gather(torch.cat(predictions)), distributed.gather(torch.cat(targets))
        return pearson(outputs, gold), outputs
    total_loss, correct, count = distributed.all_sum([total_loss, correct, count], device)
    if predictions:
        return correct / count, torch.cat(predictions)
    return math.exp(min(total_loss / count, 50.0)), torch.empty(0)
