"""Gradient explainers of a classifier's predicted class, w.r.t. its input tokens: a text model's token
embeddings, or a ViT's [CLS] and patch projections (before position embeddings, as for text).

All return pre-softmax scores (batch, tokens). Integrated gradients uses captum along the straight line from a
zero (or [PAD]-embedding) baseline to the input, `steps` points (the public SMaT code's path only covered about
10% of the way; this one reaches the input)."""

from __future__ import annotations

import torch
from captum.attr import IntegratedGradients


def input_tokens(model, batch) -> torch.Tensor:
    return model.embed(batch["input_ids"]) if "input_ids" in batch else model.embed(batch)


def _target_and_embeds(model, batch):
    embeds = input_tokens(model, batch).detach()
    with torch.no_grad():
        target = model.classify(batch)[0].argmax(-1)
    return target, embeds


def input_gradients(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    target, embeds = _target_and_embeds(model, batch)
    embeds.requires_grad_(True)
    with torch.enable_grad():
        logits = model.classify(batch, inputs_embeds=embeds)[0]
        (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), embeds)
    return grad, embeds.detach()


def gradient_norm(model, batch) -> torch.Tensor:
    grad, _ = input_gradients(model, batch)
    return grad.norm(dim=-1)


def gradient_x_input(model, batch) -> torch.Tensor:
    grad, embeds = input_gradients(model, batch)
    return (grad * embeds).sum(-1)


def integrated_gradients(model, batch, steps: int = 10, baseline: str = "zero", pad_id: int = 0) -> torch.Tensor:
    target, embeds = _target_and_embeds(model, batch)
    if baseline == "pad":
        if "input_ids" not in batch:
            raise ValueError("integrated gradients: the [PAD] baseline is for text; images use the zero baseline")
        reference = model.embed(torch.full_like(batch["input_ids"], pad_id)).detach()
    else:
        reference = torch.zeros_like(embeds)
    mask = batch.get("attention_mask")

    def logits_of(inputs_embeds, attention_mask=None):
        inputs = {} if attention_mask is None else {"attention_mask": attention_mask}
        return model.classify(inputs, inputs_embeds=inputs_embeds)[0]

    with torch.enable_grad():
        attributions = IntegratedGradients(logits_of).attribute(
            embeds,
            baselines=reference,
            target=target,
            n_steps=steps,
            internal_batch_size=embeds.shape[0],
            additional_forward_args=(mask,) if mask is not None else None,
        )
    return attributions.sum(-1).detach()
