"""Batching: tokenised and padded text batches, image batches with augmentation, language-modelling streams,
and the on-disk token cache. Tasks and their splits come from the task registry (tasks.py)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from teachsweep import layout
from teachsweep.tasks import DataError, Split, Task, subset

# ---------------------------------------------------------------------------------------------- tokenisation


def tokenize_split(texts: list[str], tokenizer, max_length: int) -> list[list[int]]:
    """Token ids per text, cached on disk by (tokenizer vocabulary, max_length, texts)."""
    key = hashlib.sha256()
    key.update(f"{tokenizer.name_or_path}|{len(tokenizer)}|{max_length}".encode())
    for text in texts:
        key.update(text.encode("utf-8", "replace") + b"\0")
    path = layout.cache_dir() / "tokens" / f"{key.hexdigest()[:24]}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(ids, tmp)
    tmp.replace(path)  # atomic: concurrent trials never read a half-written file
    return ids


def pad_batch(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.as_tensor(seq)
        mask[row, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


# ---------------------------------------------------------------------------------------------- batches


@dataclass
class Batches:
    """Everything a job needs to draw batches of one split for one model family."""

    task: Task
    split: Split
    token_ids: list[list[int]] | None = None  # text tasks, tokenised
    pad_id: int = 0

    def collate(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The examples `idx` of the split as one padded batch; `index` says which they are (for per-example
        caches such as SMaT's precomputed teacher explanations)."""
        batch = {"labels": self.split.labels[idx], "index": idx}
        if self.task.kind == "text":
            batch |= pad_batch([self.token_ids[i] for i in idx.tolist()], self.pad_id)
        else:
            batch["pixel_values"] = self.split.images[idx]
        return batch


def make_batches(task: Task, split: str, tokenizer=None, max_length: int = 128, max_examples=None) -> Batches:
    part = subset(task.splits[split], max_examples)
    if task.kind == "text":
        if tokenizer is None:
            raise DataError(f"task '{task.name}' is text: the model needs a tokenizer")
        ids = tokenize_split(part.texts, tokenizer, max_length)
        return Batches(task, part, ids, tokenizer.pad_token_id or 0)
    return Batches(task, part)


def augment_images(images: torch.Tensor, generator: torch.Generator, pad: int, flip: bool) -> torch.Tensor:
    """Random crop with zero padding (and optional horizontal flip), one offset per image."""
    n, _, h, w = images.shape
    if pad > 0:
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h))[:, :, None].expand(n, h, w)
        cols = (dx[:, None] + torch.arange(w))[:, None, :].expand(n, h, w)
        batch_idx = torch.arange(n)[:, None, None].expand(n, h, w)
        images = padded.permute(0, 2, 3, 1)[batch_idx, rows, cols].permute(0, 3, 1, 2)
    if flip:
        flipped = torch.rand(n, generator=generator) < 0.5
        images = torch.where(flipped[:, None, None, None], images.flip(-1), images)
    return images


def train_stream(
    batches: Batches,
    batch_size: int,
    seed: int,
    augment_pad: int = 0,
    augment_flip: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches (a new permutation each pass); each seed gives an independent stream."""
    generator = torch.Generator().manual_seed(seed)
    n = len(batches.split)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            batch = batches.collate(order[start : start + batch_size])
            if "pixel_values" in batch and (augment_pad or augment_flip):
                batch["pixel_values"] = augment_images(batch["pixel_values"], generator, augment_pad, augment_flip)
            yield batch


def eval_batches(batches: Batches, batch_size: int, by_length: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Every example once, in order; `by_length` groups texts of similar length (far less padding for the
    explainers whose cost grows with the padded length cubed); each batch's `index` says which examples."""
    n = len(batches.split)
    order = torch.arange(n)
    if by_length and batches.token_ids is not None:
        order = torch.tensor(sorted(range(n), key=lambda i: len(batches.token_ids[i])), dtype=torch.long)
    for start in range(0, n, batch_size):
        yield batches.collate(order[start : start + batch_size])


# ---------------------------------------------------------------------------------------------- language modelling


def batchify(tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(n_tokens,) -> (batch_size, n_tokens // batch_size): each row a contiguous slice of the stream."""
    per_row = len(tokens) // batch_size
    return tokens[: per_row * batch_size].view(batch_size, per_row)


def lm_stream(
    tokens: torch.Tensor, batch_size: int, bptt: int, start: int = 0, endless: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Contiguous bptt chunks; `reset` marks the first chunk of a pass (a recurrent state starts afresh).
    `start` offsets the stream so a second stream over the same text sees different chunks."""
    rows = batchify(tokens, batch_size)
    length = rows.size(1)
    position, first = start % max(1, length - 1), True
    while True:
        while position < length - 1:
            width = min(bptt, length - 1 - position)
            yield {
                "input_ids": rows[:, position : position + width],
                "labels": rows[:, position + 1 : position + 1 + width],
                "reset": torch.tensor(first),
            }
            position, first = position + width, False
        if not endless:
            return
        position, first = 0, True
