"""Teacher explainers by name, with their default explanation weight beta (docs/jobs/scaffold.md).

Attention explainers are head mixes over the teacher's attention (`smat` learns the mix); the others are static
functions of the frozen teacher and a batch returning pre-softmax token scores. New explainers (the relevance
explainers) plug in by adding an entry to STATIC."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from teachsweep.explain import gradient, lrp, relevance
from teachsweep.explain.attention import AttentionExplainer, head_scores


@dataclass(frozen=True)
class ExplainerInfo:
    kind: str  # "none" | "attention" | "static"
    default_beta: float
    learnable: bool = False
    layer: int | None = None  # attention: restrict to one layer
    images: bool = True  # works for ViT too


ATTENTION = {
    "smat": ExplainerInfo("attention", 5.0, learnable=True),
    "attention": ExplainerInfo("attention", 5.0),  # all layers, frozen uniform head mix
    "attention_last": ExplainerInfo("attention", 5.0, layer=-1),
}


def _relevance_scores(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def scores(model, batch, **_):
        return relevance.as_scores(fn(model, batch), model.explained_tokens(batch))

    scores.__name__ = fn.__name__
    return scores


# name: (function(model, batch) -> pre-softmax token scores, default beta, works for ViT)
STATIC: dict[str, tuple[Callable[..., torch.Tensor], float, bool]] = {
    "grad_norm": (gradient.gradient_norm, 0.2, True),
    "grad_x_input": (gradient.gradient_x_input, 0.2, True),
    "integrated_gradients": (gradient.integrated_gradients, 0.2, True),
    # Relevance maps are distributions over tokens like attention: the attention explainers' beta.
    **{name: (_relevance_scores(fn), 5.0, True) for name, fn in relevance.EXPLAINERS.items()},
    "lrp": (_relevance_scores(lrp.lrp_attribution), 5.0, True),  # Chefer et al. CVPR 2021
    "partial_lrp": (_relevance_scores(lrp.partial_lrp), 5.0, True),
    "full_lrp": (_relevance_scores(lrp.full_lrp), 5.0, True),
}


def explainer_info(name: str) -> ExplainerInfo:
    if name == "none":
        return ExplainerInfo("none", 0.0)
    if name in ATTENTION:
        return ATTENTION[name]
    if name in STATIC:
        return ExplainerInfo("static", STATIC[name][1], images=STATIC[name][2])
    raise ValueError(f"unknown explainer '{name}' (known: {', '.join(names())})")


def names() -> list[str]:
    return ["none", *ATTENTION, *STATIC]


def explain(name: str, model, batch: dict, **kwargs) -> torch.Tensor:
    """Pre-softmax token scores of a frozen model for one explainer (attention mixes use uniform heads)."""
    info = explainer_info(name)
    if info.kind == "static":
        return STATIC[name][0](model, batch, **kwargs)
    if info.kind != "attention" or info.learnable:
        raise ValueError(f"explainer '{name}' needs training (use the scaffold job); it cannot explain a model alone")
    _, attentions, _, mask = relevance.target_and_attentions(model, batch, need_grad=False, log_attention=True)
    layers, heads = len(attentions), attentions[0].shape[1]
    mixer = AttentionExplainer(layers, heads, layer=info.layer, learnable=False).to(mask.device)
    return mixer(head_scores(attentions, mask), mask)
