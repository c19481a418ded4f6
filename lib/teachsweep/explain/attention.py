"""SMaT's parameterised attention explainer (Fernandes et al. 2022), in PyTorch.

For every head k (layers x heads, layer-major) the pre-softmax scores Z^(k) are averaged over the real query
rows, mixed with head coefficients lambda = sparsemax(phi), and turned into a distribution over tokens by a
masked softmax. The models' attention returns log A = log_softmax(Z) on request (`classify(...,
log_attention=True)`): log A = Z - logsumexp_row(Z), and after the mean over rows the logsumexp is one constant
per head, which the mix keeps constant over tokens and the final softmax removes, so log A gives the same
explanation and the same gradients as Z. Taking the log of the probabilities instead is not exact: entries that
underflow (1e-39 in a pretrained MiniLM) lose digits or become 0, and their gradient 1/A overflows."""

from __future__ import annotations

from typing import Literal

import torch
from entmax import entmax15, sparsemax
from torch import nn

Normalizer = Literal["sparsemax", "softmax", "entmax15"]
MASKED = -1e10


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 activations to float32; float32 and float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def head_scores(log_attentions: tuple[torch.Tensor, ...], mask: torch.Tensor) -> torch.Tensor:
    """(batch, layers*heads, tokens): per-head scores of each key token, a masked mean over query rows of the
    attention log-probabilities (`classify(..., log_attention=True)`); padded keys get 0 (the token softmax
    masks them) rather than the mask's -3e38, which the mix could overflow."""
    log_attention = full_precision(torch.stack(log_attentions, dim=1).flatten(1, 2))  # (B, K, n, n)
    # Probabilities passed by mistake would give a plausible-looking, wrong explanation; an async check keeps
    # the device stream free of a host sync.
    torch._assert_async(log_attention.amax() <= 0, "head_scores needs log-probabilities (log_attention=True)")
    real_keys = mask[:, None, None, :].bool()
    log_attention = log_attention.masked_fill(~real_keys, 0.0)
    rows = mask.to(log_attention.dtype) / mask.sum(-1, keepdim=True).clamp_min(1).to(log_attention.dtype)  # (B, n)
    return torch.einsum("bkij,bi->bkj", log_attention, rows)


def token_distribution(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked softmax over tokens: padding gets probability 0."""
    return torch.softmax(full_precision(scores).masked_fill(mask == 0, MASKED), dim=-1)


class AttentionExplainer(nn.Module):
    """Learnable head mix: the only parameter is phi (one entry per head), initialised uniformly to 1/K.

    `layer` restricts the mix to one layer's heads (the "last layer" baseline is layer=-1); `head` picks a single
    (layer-major) head; `learnable=False` freezes phi (the static "attention, uniform heads" baseline)."""

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        normalizer: Normalizer = "sparsemax",
        layer: int | None = None,
        head: int | None = None,
        learnable: bool = True,
    ):
        super().__init__()
        self.num_layers, self.num_heads, self.normalizer = num_layers, num_heads, normalizer
        heads = num_layers * num_heads
        allowed = torch.ones(heads, dtype=torch.bool)
        if layer is not None:
            layer = layer % num_layers
            allowed = torch.zeros(heads, dtype=torch.bool)
            allowed[layer * num_heads : (layer + 1) * num_heads] = True
        if head is not None:
            allowed = torch.zeros(heads, dtype=torch.bool)
            allowed[head] = True
        self.register_buffer("allowed", allowed)
        self.phi = nn.Parameter(torch.full((heads,), 1.0 / int(allowed.sum())), requires_grad=learnable)

    def coefficients(self) -> torch.Tensor:
        logits = self.phi.masked_fill(~self.allowed, -1e4 if self.normalizer != "softmax" else MASKED)
        if self.normalizer == "sparsemax":
            return sparsemax(logits, dim=-1)
        if self.normalizer == "entmax15":
            return entmax15(logits, dim=-1)
        return torch.softmax(logits, dim=-1)

    def forward(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Head scores (batch, K, tokens) -> explanation scores (batch, tokens), before the token softmax."""
        return torch.einsum("bkj,k->bj", scores, self.coefficients().to(scores.dtype))

    def coefficient_map(self) -> list[list[float]]:
        return self.coefficients().detach().view(self.num_layers, self.num_heads).cpu().tolist()
