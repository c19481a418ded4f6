"""Attention-based relevance explainers (Chefer et al.; Abnar & Zuidema), batched, for text encoders and ViT.

All need the model's post-softmax attention (eager attention) and, for the gradient-weighted ones, dy_t/dA for a
per-sample target class t, taken with `torch.autograd.grad` on the attention tensors themselves: no parameter
.grad is touched, no hook or class is patched, nothing global changes.

Read-out: a model that classifies from [CLS] (BERT `cls` pooling, ViT) is explained by the [CLS] row of the
relevance matrix; a mean-pooled encoder (MiniLM here) by the mean of the real-token rows, since its output is a
mean over all rows. The generic rule and LRP attribution accumulate R = I + ...: the identity is no evidence
about any input (it kept 71-96% of a trained ViT's mass on [CLS], and made a mean-pooled encoder's explanation
near-uniform), so they read out R - I. Scores are non-negative relevances per token, and only the tokens an
explanation may rank (`model.explained_tokens`: real tokens without [CLS]/[SEP], ViT patches without [CLS]) get
any: padding and specials are 0. `as_scores` takes their log so that a softmax gives back relevance /
sum(relevance) over those tokens, and the others probability 0."""

from __future__ import annotations

import torch

from teachsweep.explain.attention import MASKED


def target_and_attentions(
    model, batch: dict, target: torch.Tensor | None = None, need_grad: bool = True, log_attention: bool = False
):
    """(target classes, attentions per layer (B, H, n, n) (or their logarithms), their gradients or None, token
    mask)."""
    was_training = model.training
    model.eval()
    with torch.enable_grad():
        # Differentiable inputs give the attention a graph even when every parameter is frozen.
        if "input_ids" in batch:
            embeds = model.embed(batch["input_ids"]).detach().requires_grad_(need_grad)
            logits, attentions = model.classify(
                batch, inputs_embeds=embeds, output_attentions=True, log_attention=log_attention
            )
        else:
            pixels = batch["pixel_values"].detach().requires_grad_(need_grad)
            logits, attentions = model.classify(
                {"pixel_values": pixels}, output_attentions=True, log_attention=log_attention
            )
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


def read_out_row(relevance: torch.Tensor, mask: torch.Tensor, model) -> torch.Tensor:
    """Relevance matrices (B, n, n) -> (B, n): the [CLS] row, or the mean of the real rows (`mask`) for a
    mean-pooled model, whose output is the mean of them all; padded keys are 0."""
    if getattr(model, "pooling", "cls") == "mean":
        rows = mask.to(relevance.dtype) / mask.sum(-1, keepdim=True).clamp_min(1).to(relevance.dtype)
        out = torch.einsum("bi,bij->bj", rows, relevance)
    else:
        out = relevance[:, 0]
    return out * mask


def readout(relevance: torch.Tensor, mask: torch.Tensor, model, batch: dict) -> torch.Tensor:
    """Token relevance (B, n) of the read-out row, on the tokens the model's explanations rank, 0 elsewhere."""
    return read_out_row(relevance, mask, model) * model.explained_tokens(batch).to(relevance.dtype)


def without_identity(relevance: torch.Tensor) -> torch.Tensor:
    """R - I: what the layers added to the identity the rule starts from."""
    return relevance - torch.eye(relevance.shape[-1], device=relevance.device, dtype=relevance.dtype)


def generic_rule(model, batch: dict, target: torch.Tensor | None = None) -> torch.Tensor:
    """Chefer et al. (ICCV 2021): R <- R + mean_heads((dy/dA * A)^+) @ R, from the identity, layer by layer;
    read out R - I."""
    _, attentions, grads, mask = target_and_attentions(model, batch, target)
    batch_size, _, n, _ = attentions[0].shape
    relevance = torch.eye(n, device=mask.device).expand(batch_size, n, n).clone()
    for attention, grad in zip(attentions, grads, strict=True):
        weighted = (grad * attention).clamp(min=0).mean(dim=1)  # head mean over dim 1, per sample
        relevance = relevance + torch.bmm(weighted, relevance)
    return readout(without_identity(relevance), mask, model, batch)


def rollout(model, batch: dict, target: torch.Tensor | None = None) -> torch.Tensor:
    """Abnar & Zuidema: head mean, (A + I) row-normalised, multiplied over layers (later layers on the left)."""
    _, attentions, _, mask = target_and_attentions(model, batch, target, need_grad=False)
    return readout(rollout_matrix(attentions), mask, model, batch)


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
    return readout(attentions[-1].mean(dim=1), mask, model, batch)


def gradcam_head_weights(grads: torch.Tensor, mask: torch.Tensor, model) -> torch.Tensor:
    """(B, H): each head's weight, the mean gradient over the real keys of the read-out row (the [CLS] row, or
    the mean of the real rows for a mean-pooled encoder); padded rows and keys never enter."""
    batch_size, heads, n, _ = grads.shape
    rows = read_out_row(grads.flatten(0, 1), mask.repeat_interleave(heads, dim=0), model).view(batch_size, heads, n)
    return rows.sum(-1) / mask.sum(-1, keepdim=True).to(rows.dtype)


def attention_gradcam(model, batch: dict, target: torch.Tensor | None = None) -> torch.Tensor:
    """GradCAM on the last attention layer: heads weighted by their mean read-out-row gradient, positive part."""
    _, attentions, grads, mask = target_and_attentions(model, batch, target)
    weights = gradcam_head_weights(grads[-1], mask, model)
    cam = (weights[:, :, None, None] * attentions[-1]).sum(dim=1).clamp(min=0)
    return readout(cam, mask, model, batch)


def as_scores(relevance: torch.Tensor, explained: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Pre-softmax scores whose softmax is relevance / sum(relevance) over the `explained` tokens (the others get
    MASKED, probability 0). A token with no relevance gets eps of the row's largest: relevance has no
    natural scale, so a fixed floor would be a different share of every row; a row with none at all is uniform."""
    relevance = relevance.clamp(min=0)
    floor = eps * relevance.amax(-1, keepdim=True) + torch.finfo(relevance.dtype).tiny
    return (relevance + floor).log().masked_fill(~explained, MASKED)


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
