"""Attention-based relevance explainers (Chefer et al.; Abnar & Zuidema), batched, for text encoders and ViT.

All need the model's post-softmax attention (eager attention) and, for the gradient-weighted ones, dy_t/dA for a
per-sample target class t, taken with `torch.autograd.grad` on the attention tensors themselves: no parameter
.grad is touched, no hook or class is patched, nothing global changes.

Read-out: a model that classifies from [CLS] (BERT `cls` pooling, ViT) is explained by the [CLS] row of the
relevance matrix; a mean-pooled encoder (MiniLM here) by the mean of the real-token rows, since its output is a
mean over all rows. Scores are non-negative relevances per token with padding at 0; `as_scores` takes their log so
that the masked softmax SMaT applies gives back relevance / sum(relevance)."""

from __future__ import annotations

import torch


def target_and_attentions(model, batch: dict, target: torch.Tensor | None = None, need_grad: bool = True):
    """(target classes, attentions per layer (B, H, n, n), their gradients or None, token mask)."""
    was_training = model.training
    model.eval()
    with torch.enable_grad():
        # Differentiable inputs give the attention a graph even when every parameter is frozen.
        if "input_ids" in batch:
            embeds = model.embed(batch["input_ids"]).detach().requires_grad_(need_grad)
            logits, attentions = model.classify(batch, inputs_embeds=embeds, output_attentions=True)
        else:
            pixels = batch["pixel_values"].detach().requires_grad_(need_grad)
            logits, attentions = model.classify({"pixel_values": pixels}, output_attentions=True)
        target = logits.argmax(-1) if target is None else target.to(logits.device)
        grads = None
        if need_grad:
            grads = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), attentions)
    model.train(was_training)
    attentions = tuple(a.detach() for a in attentions)
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones(
            attentions[0].shape[0], attentions[0].shape[-1], dtype=torch.long, device=attentions[0].device
        )
    return target, attentions, grads, mask


def readout(relevance: torch.Tensor, mask: torch.Tensor, model) -> torch.Tensor:
    """Relevance matrices (B, n, n) -> token relevance (B, n): the [CLS] row, or the mean of real rows."""
    if getattr(model, "pooling", "cls") == "mean":
        rows = mask.to(relevance.dtype) / mask.sum(-1, keepdim=True).clamp_min(1).to(relevance.dtype)
        out = torch.einsum("bi,bij->bj", rows, relevance)
    else:
        out = relevance[:, 0]
    return out * mask


def generic_rule(model, batch: dict, target: torch.Tensor | None = None) -> torch.Tensor:
    """Chefer et al. (ICCV 2021): R <- R + mean_heads((dy/dA * A)^+) @ R, from the identity, layer by layer."""
    _, attentions, grads, mask = target_and_attentions(model, batch, target)
    batch_size, _, n, _ = attentions[0].shape
    relevance = torch.eye(n, device=mask.device).expand(batch_size, n, n).clone()
    for attention, grad in zip(attentions, grads, strict=True):
        weighted = (grad * attention).clamp(min=0).mean(dim=1)  # head mean over dim 1, per sample
        relevance = relevance + torch.bmm(weighted, relevance)
    return readout(relevance, mask, model)


def rollout(model, batch: dict, target: torch.Tensor | None = None) -> torch.Tensor:
    """Abnar & Zuidema: head mean, (A + I) row-normalised, multiplied over layers (later layers on the left)."""
    _, attentions, _, mask = target_and_attentions(model, batch, target, need_grad=False)
    return readout(rollout_matrix(attentions), mask, model)


def rollout_matrix(attentions: tuple[torch.Tensor, ...]) -> torch.Tensor:
    batch_size, _, n, _ = attentions[0].shape
    eye = torch.eye(n, device=attentions[0].device)
    result = eye.expand(batch_size, n, n).clone()
    for attention in attentions:
        step = attention.mean(dim=1) + eye
        step = step / step.sum(-1, keepdim=True)
        result = torch.bmm(step, result)
    return result


def raw_attention(model, batch: dict, target: torch.Tensor | None = None) -> torch.Tensor:
    """The last layer's head-mean attention."""
    _, attentions, _, mask = target_and_attentions(model, batch, target, need_grad=False)
    return readout(attentions[-1].mean(dim=1), mask, model)


def gradcam_head_weights(grads: torch.Tensor, mask: torch.Tensor, model) -> torch.Tensor:
    """(B, H): each head's weight, the mean gradient over the real keys of the read-out row (the [CLS] row, or
    the mean of the real rows for a mean-pooled encoder); padded rows and keys never enter."""
    batch_size, heads, n, _ = grads.shape
    rows = readout(grads.flatten(0, 1), mask.repeat_interleave(heads, dim=0), model).view(batch_size, heads, n)
    return rows.sum(-1) / mask.sum(-1, keepdim=True).to(rows.dtype)


def attention_gradcam(model, batch: dict, target: torch.Tensor | None = None) -> torch.Tensor:
    """GradCAM on the last attention layer: heads weighted by their mean read-out-row gradient, positive part."""
    _, attentions, grads, mask = target_and_attentions(model, batch, target)
    weights = gradcam_head_weights(grads[-1], mask, model)
    cam = (weights[:, :, None, None] * attentions[-1]).sum(dim=1).clamp(min=0)
    return readout(cam, mask, model)


def as_scores(relevance: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pre-softmax scores whose masked softmax is relevance / sum(relevance)."""
    return (relevance.clamp(min=0) + eps).log()


def single_example_loop(explainer, model, batch: dict) -> list[torch.Tensor]:
    """The reference codes' way: one example at a time, without padding (benchmark and tests)."""
    out = []
    for row in range(batch[next(iter(batch))].shape[0]):
        if "attention_mask" in batch:
            length = int(batch["attention_mask"][row].sum())
            single = {k: v[row : row + 1, :length] for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        else:
            single = {"pixel_values": batch["pixel_values"][row : row + 1]}
        out.append(explainer(model, single)[0])
    return out


EXPLAINERS = {
    "relevance": generic_rule,
    "rollout": rollout,
    "raw_attention": raw_attention,
    "attention_gradcam": attention_gradcam,
}
