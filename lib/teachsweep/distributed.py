"""What a job needs to run under DDP: its rank and world size, a shard of each global batch, and sums reduced
across workers. Everything is a no-op in a single process, so jobs call these unconditionally."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

_alone = False


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed or inside `alone()`."""
    if not _alone and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def alone() -> Iterator[None]:
    """Run as if there were one worker (no sharding, no collectives): for work one worker does for all, such as
    training the shared teacher while the others wait on its registry lock."""
    global _alone
    previous, _alone = _alone, True
    try:
        yield
    finally:
        _alone = previous


def shard(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This worker's rows of a global batch (every worker draws the same global batch from the same seed), so
    that N workers with DDP's gradient averaging take the same step as one worker on the whole batch."""
    rank, size = world()
    if size == 1:
        return batch
    return {k: v if v.dim() == 0 else v[rank::size] for k, v in batch.items()}


def wrap(model: nn.Module) -> nn.Module:
    """DDP around a model (gloo on CPU, NCCL on GPU, chosen by whoever initialised the process group). On GPUs,
    batch norms become synchronised batch norms, so that N workers normalise with the global batch's statistics,
    as one process would; torch has no synchronised batch norm on the CPU, where each gloo worker normalises its
    own shard (docs/clusters.md says so)."""
    if world()[1] == 1:
        return model
    on_gpu = next(model.parameters()).is_cuda
    if on_gpu:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if on_gpu else None)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over workers (counts and totals for metrics reported once)."""
    if world()[1] == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def average_gradients(params: list[torch.Tensor]) -> None:
    """Average `.grad` over workers in place: what DDP's hooks do, for jobs that step without a DDP wrapper."""
    grads = [p.grad for p in params if p.grad is not None]
    for grad, mean in zip(grads, all_mean_many(grads), strict=True):
        grad.copy_(mean)


def all_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over workers (a new tensor, outside autograd)."""
    return all_mean_many([tensor])[0]


def all_mean_many(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The means of `tensors` over workers (new tensors, outside autograd), in one all-reduce per dtype: one per
    tensor would launch a collective for every parameter of the model and leave a GPU waiting between them."""
    size = world()[1]
    if size == 1:
        return [t.detach() for t in tensors]
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        group = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in group])
        dist.all_reduce(flat)
        flat /= size
        for i, part in zip(group, flat.split([tensors[i].numel() for i in group]), strict=True):
            out[i] = part.view_as(tensors[i]).clone()  # its own storage: a leaf autograd can differentiate by
    return out


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every worker's `tensor` (any length along dim 0), concatenated in rank order, on every worker."""
    size = world()[1]
    if size == 1:
        return tensor
    parts: list = [None] * size
    dist.all_gather_object(parts, tensor.detach().cpu())
    return torch.cat(parts)
