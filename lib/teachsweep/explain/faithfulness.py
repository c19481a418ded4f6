"""Perturbation tests (Chefer et al. CVPR 2021): remove the most (positive test) or least (negative test)
relevant 10%..90% of tokens or patches and record how often the model keeps its original prediction.

Text tokens are removed by masking them out of attention ([CLS]/[SEP] and padding are never candidates); ViT
patches by setting their pixels to 0 (the normalised data mean). The AUC is the area under accuracy vs. removed
fraction over [0.1, 0.9], divided by 0.8 so that it reads as a mean accuracy: lower is better for the positive
test, higher for the negative test."""

from __future__ import annotations

import numpy as np
import torch

FRACTIONS = tuple(round(0.1 * k, 1) for k in range(1, 10))


def candidate_mask(batch: dict, special_ids: set[int], num_tokens: int) -> torch.Tensor:
    """Tokens an explanation may rank: real, non-special text tokens, or every ViT patch (not [CLS])."""
    if "input_ids" in batch:
        special = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        for token_id in special_ids:
            special |= batch["input_ids"] == token_id
        return (batch["attention_mask"] == 1) & ~special
    mask = torch.ones(batch["pixel_values"].shape[0], num_tokens, dtype=torch.bool)
    mask[:, 0] = False
    return mask


def remove(batch: dict, removed: torch.Tensor, patch_size: int | None) -> dict:
    """A copy of the batch with the `removed` tokens (bool, batch x tokens) taken out."""
    if "input_ids" in batch:
        return batch | {"attention_mask": batch["attention_mask"] * (~removed).long()}
    pixels = batch["pixel_values"]
    grid = pixels.shape[-1] // patch_size
    # patch mask -> pixel mask in tensor ops (no loop over patches, no host sync): a GPU keeps its queue full
    patches = removed[:, 1:].reshape(-1, grid, grid)
    pixel_mask = patches.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)
    pixels = pixels * (~pixel_mask).unsqueeze(1).to(pixels.dtype)
    return batch | {"pixel_values": pixels}


@torch.no_grad()
def kept_predictions(model, batch: dict, relevance: torch.Tensor, special_ids: set[int], patch_size=None):
    """{"positive": (batch, fractions) bool, "negative": ...}: whether each example keeps its unperturbed
    prediction once that fraction of its candidates is removed (per example, for paired comparisons)."""
    model.eval()
    original = model(batch)[0].argmax(-1)
    candidates = candidate_mask(batch, special_ids, relevance.shape[1]).to(relevance.device)
    counts = candidates.sum(-1)
    kept = {}
    for test, descending in (("positive", True), ("negative", False)):
        fill = -torch.inf if descending else torch.inf
        order = torch.argsort(relevance.masked_fill(~candidates, fill), dim=-1, descending=descending)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        per_fraction = []
        for fraction in FRACTIONS:
            k = torch.round(fraction * counts).long()
            removed = (rank < k[:, None]) & candidates
            per_fraction.append(model(remove(batch, removed, patch_size))[0].argmax(-1) == original)
        kept[test] = torch.stack(per_fraction, dim=1)
    return kept


def perturbation_curves(model, batch: dict, relevance: torch.Tensor, special_ids: set[int], patch_size=None):
    """{"positive": [accuracy per fraction], "negative": [...]} against the unperturbed predictions."""
    kept = kept_predictions(model, batch, relevance, special_ids, patch_size)
    return {test: k.float().mean(0).tolist() for test, k in kept.items()}  # one host sync per test


def example_aucs(kept: torch.Tensor) -> np.ndarray:
    """(examples, fractions) kept predictions -> each example's AUC (the same normalisation as `auc`)."""
    values = kept.float().cpu().numpy()
    return np.trapezoid(values, FRACTIONS, axis=1) / (FRACTIONS[-1] - FRACTIONS[0])


def auc(accuracies: list[float]) -> float:
    return float(np.trapezoid(accuracies, FRACTIONS) / (FRACTIONS[-1] - FRACTIONS[0]))
