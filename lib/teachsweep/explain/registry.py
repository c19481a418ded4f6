"""Teacher explainers by name, with their default explanation weight beta (smat.md).

Attention explainers are head mixes over the teacher's attention (`smat` learns the mix); the others are static
functions of the frozen teacher and a batch returning pre-softmax token scores. New explainers (the relevance
explainers) plug in by adding an entry to STATIC."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from teachsweep.explain import gradient


@dataclass(frozen=True)
class ExplainerInfo:
    kind: str  # "none" | "attention" | "static"
    default_beta: float
    learnable: bool = False
    layer: int | None = None  # attention: restrict to one layer


ATTENTION = {
    "smat": ExplainerInfo("attention", 5.0, learnable=True),
    "attention": ExplainerInfo("attention", 5.0),  # all layers, frozen uniform head mix
    "attention_last": ExplainerInfo("attention", 5.0, layer=-1),
}
STATIC: dict[str, tuple[Callable[..., torch.Tensor], float]] = {
    "grad_norm": (gradient.gradient_norm, 0.2),
    "grad_x_input": (gradient.gradient_x_input, 0.2),
    "integrated_gradients": (gradient.integrated_gradients, 0.2),
}


def explainer_info(name: str) -> ExplainerInfo:
    if name == "none":
        return ExplainerInfo("none", 0.0)
    if name in ATTENTION:
        return ATTENTION[name]
    if name in STATIC:
        return ExplainerInfo("static", STATIC[name][1])
    raise ValueError(f"unknown explainer '{name}' (known: {', '.join(names())})")


def names() -> list[str]:
    return ["none", *ATTENTION, *STATIC]
