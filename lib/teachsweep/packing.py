"""Packed training: P members of one job that share their structure (model, batch size, steps) trained as one.

A member is one trial's configuration. Its model's parameters and buffers are stacked along a leading member
dimension (`torch.func.stack_module_state`) and one vmapped call of the architecture runs every member on its own
batch (`vmap(functional_call)`): batch-norm statistics stay per member, and a member's outputs, gradients and
updates are those of its unpacked twin, up to float rounding.

torch.optim applies one learning rate to a tensor, so the stacked parameters get their own optimizer here, with
every hyperparameter a per-member tensor (learning rate, weight decay, momentum, gradient clip) and the same
update rules as torch's SGD, Adam and AdamW. A member that stops or fails leaves the pack at an epoch boundary:
`keep` drops its slice from the parameters and the optimizer state, and the pack's compute shrinks with it.

A model made only of linear layers and elementwise activations, whose forward acts on the last dimension alone
(the MLP agents of LoT for RL), can run `by_layer`: each linear layer one batched matmul over the members
(`baddbmm`), without vmap. Small models are dominated by vmap's per-call cost (measured in `bench pack`)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from teachsweep.training import autocast, to_device

Tensors = dict[str, torch.Tensor]


def member_column(
    values: Sequence[float | None], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Per-member scalars as a tensor (P,); None (no clip) becomes +inf, which clips nothing. Optimizer settings
    are kept in double, as the Python floats torch's optimizers compute with."""
    return torch.tensor([math.inf if v is None else float(v) for v in values], dtype=dtype, device=device)


def along_members(column: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (P,) column shaped to broadcast over a stacked tensor (P, ...)."""
    return column.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def first(output: Any) -> torch.Tensor:
    """A model's logits from its (logits, recurrent state) output."""
    return output[0]


def whole(output: Any) -> Any:
    return output


ELEMENTWISE = (nn.Tanh, nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Identity)


class MemberLinear(nn.Module):
    """nn.Linear over stacked members: weight (P, out, in), bias (P, out) or None, inputs (P, ..., in). It holds
    no parameters: the stacked model binds its tensors as plain attributes before each call, which costs a few
    dict writes where `functional_call`'s swap of every parameter cost about a third of a small agent's step."""

    def __init__(self) -> None:
        super().__init__()
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(x.shape[0], -1, x.shape[-1])
        weight = self.weight.transpose(1, 2)
        out = torch.bmm(rows, weight) if self.bias is None else torch.baddbmm(self.bias.unsqueeze(1), rows, weight)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def by_layer_architecture(module: nn.Module) -> nn.Module:
    """A copy of `module` whose linear layers take stacked members (MemberLinear); refused unless every leaf is a
    linear layer or an elementwise activation and every parameter and buffer is a linear layer's (a convolution, a
    norm, or a parameter a forward uses by itself needs vmap). The forward's own code must act on the last
    dimension only (as an MLP's does): that is the caller's promise, which no check here can see."""
    leaves = [m for m in module.modules() if not list(m.children())]
    others = sorted({type(m).__name__ for m in leaves if not isinstance(m, (nn.Linear, *ELEMENTWISE))})
    if others:
        raise ValueError(f"by_layer packs linear layers and elementwise activations only, not {', '.join(others)}")
    linear = {name for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    loose = [
        name
        for name, _ in [*module.named_parameters(), *module.named_buffers()]
        if name.rpartition(".")[0] not in linear
    ]
    if loose:
        raise ValueError(f"by_layer stacks linear layers' parameters only, not {', '.join(loose)}")
    if isinstance(module, nn.Linear):
        return MemberLinear()
    stacked = copy.deepcopy(module)
    for name, child in list(stacked.named_modules()):
        if isinstance(child, nn.Linear):
            parent, _, attribute = name.rpartition(".")
            setattr(stacked.get_submodule(parent) if parent else stacked, attribute, MemberLinear())
    return stacked


def bind(module: nn.Module, tensors: Tensors) -> None:
    """Each of `tensors` (named as in a state_dict) set as the plain attribute of its MemberLinear."""
    for name, tensor in tensors.items():
        owner, _, attribute = name.rpartition(".")
        module.get_submodule(owner).__dict__[attribute] = tensor


class StackedModel:
    """P models of one architecture as stacked parameters and buffers; calling it runs every member at once.

    `model(batch)` with inputs stacked by member (P, B, ...) gives each member its own inputs; `model(batch,
    shared=True)` gives all members the same inputs (B, ...), as evaluation does. Keyword options go to each
    member's forward unchanged; `pick` selects what of the forward's output is returned (tensors only). With
    `by_layer` the architecture runs once over the stacked members, each linear layer a batched matmul
    (`by_layer_architecture`: for models whose forward acts on the last dimension only)."""

    def __init__(self, modules: Sequence[nn.Module], pick: Callable[[Any], Any] = first, by_layer: bool = False):
        self.params, self.buffers = stack_module_state(list(modules))
        self.architecture = copy.deepcopy(modules[0]).to("meta")  # only its code and shapes are used
        self.layered = by_layer_architecture(self.architecture) if by_layer else None
        self.pick = pick
        self.training = True

    @property
    def size(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def trainable(self) -> Tensors:
        return {name: p for name, p in self.params.items() if p.requires_grad}

    def train(self, mode: bool = True) -> StackedModel:
        self.training = mode
        self.architecture.train(mode)
        if self.layered is not None:
            self.layered.train(mode)
        return self

    def eval(self) -> StackedModel:
        return self.train(False)

    def __call__(self, *inputs: Any, shared: bool = False, **options: Any) -> Any:
        if self.layered is not None:
            if shared:
                inputs = tuple(x.expand(self.size, *x.shape) for x in inputs)
            bind(self.layered, self.params)
            return self.pick(self.layered(*inputs, **options))

        def one_member(params: Tensors, buffers: Tensors, *member_inputs: Any) -> Any:
            return self.pick(functional_call(self.architecture, (params, buffers), member_inputs, options))

        in_dims = (0, 0, *[None if shared else 0] * len(inputs))
        return vmap(one_member, in_dims=in_dims, randomness="different")(self.params, self.buffers, *inputs)

    def member_state(self, member: int) -> Tensors:
        """One member's state_dict, as its unpacked twin's `state_dict()` holds it (detached copies)."""
        state = {name: tensor[member].detach().clone() for name, tensor in {**self.params, **self.buffers}.items()}
        order = [name for name, _ in self.architecture.state_dict().items()]
        return {name: state[name] for name in order if name in state}

    def keep(self, members: Sequence[int]) -> None:
        """Only these members go on (the others stopped or failed)."""
        index = torch.tensor(list(members), dtype=torch.long, device=next(iter(self.params.values())).device)
        self.params = {name: keep_rows(p, index) for name, p in self.params.items()}
        self.buffers = {name: b.index_select(0, index) for name, b in self.buffers.items()}


def keep_rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A stacked leaf with only the members at `index`, still a leaf (requiring grad as before)."""
    kept = tensor.detach().index_select(0, index)
    return kept.requires_grad_(tensor.requires_grad)


def clip_per_member(grads: Sequence[torch.Tensor], max_norm: torch.Tensor) -> None:
    """torch.nn.utils.clip_grad_norm_ for each member on its own: the norm of the per-tensor norms, then each
    gradient scaled by max_norm / (norm + 1e-6) where that is below 1 (a member whose max_norm is inf keeps its)."""
    grads = [g for g in grads if g is not None]
    if not grads or bool(torch.isinf(max_norm).all()):
        return
    norms = torch.stack([torch.linalg.vector_norm(g.detach().flatten(1), 2, dim=1) for g in grads])
    total = torch.linalg.vector_norm(norms, 2, dim=0)
    scale = (max_norm.to(total.dtype) / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(along_members(scale, g))


class StackedOptimizer:
    """SGD (momentum, Nesterov, weight decay), Adam (L2 weight decay) and AdamW (decoupled) on stacked
    parameters, with a per-member learning rate, weight decay, momentum and clip, and a shared schedule factor
    (`lr_factor(step)`, as torch's LambdaLR gives it). Updates follow torch's single-tensor implementations."""

    def __init__(
        self,
        params: Tensors,
        kind: str,
        lr: torch.Tensor,
        weight_decay: torch.Tensor,
        momentum: torch.Tensor,
        clip: torch.Tensor,
        nesterov: bool = False,
        lr_factor: Callable[[int], float | torch.Tensor] = lambda step: 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        schedule_per_step: bool = True,
    ):
        """`lr_factor(t)` is the schedule's factor (one number, or one per member) after t schedule steps: one
        per optimizer step, or, with `schedule_per_step` off, one per `advance_schedule()` (RL steps its schedule
        once per update of many minibatches)."""
        self.params, self.kind, self.nesterov, self.lr_factor = params, kind, nesterov, lr_factor
        self.base_lr, self.weight_decay, self.momentum = lr.double(), weight_decay.double(), momentum.double()
        self.clip = clip
        self.betas, self.eps, self.schedule_per_step = betas, eps, schedule_per_step
        self.steps = self.schedule_steps = 0
        self.state: dict[str, Tensors] = {name: {} for name in params}
        self.kept: torch.Tensor | None = None  # which of the first members are left (a per-member schedule's rows)

    def current_lr(self) -> torch.Tensor:
        """Each member's learning rate now (double): its base rate times the schedule's factor."""
        factor = self.lr_factor(self.schedule_steps)
        if isinstance(factor, torch.Tensor) and self.kept is not None:
            factor = factor[self.kept]
        return self.base_lr.double() * factor

    def advance_schedule(self) -> None:
        self.schedule_steps += 1

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad for p in self.params.values()]
        clip_per_member(grads, self.clip)
        lr = self.current_lr()
        for name, p in self.params.items():
            if p.grad is None:
                continue
            if self.kind == "sgd":
                self.sgd(p, p.grad, self.state[name], lr)
            else:
                self.adam(p, p.grad, self.state[name], lr, decoupled=self.kind == "adamw")
        self.steps += 1
        if self.schedule_per_step:
            self.schedule_steps += 1

    def sgd(self, p: torch.Tensor, grad: torch.Tensor, state: Tensors, lr: torch.Tensor) -> None:
        grad = grad + along_members(self.weight_decay, p) * p
        momentum = along_members(self.momentum, p)
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = grad.clone()  # torch: the first step's buffer is the gradient itself
        else:
            state["momentum_buffer"].mul_(momentum).add_(grad)
        buffer = state["momentum_buffer"]
        with_momentum = grad + momentum * buffer if self.nesterov else buffer
        # a member without momentum steps on its raw gradient, as torch's SGD with momentum=0 does
        direction = torch.where(momentum > 0, with_momentum, grad)
        p.add_(along_members(-lr, p) * direction)

    def adam(self, p: torch.Tensor, grad: torch.Tensor, state: Tensors, lr: torch.Tensor, decoupled: bool) -> None:
        """torch's single-tensor Adam/AdamW, its per-step numbers (lr / bias correction, 1 - lr * decay) computed
        in double as torch computes them from Python floats, then applied in the parameter's precision."""
        beta1, beta2 = self.betas
        if decoupled:
            p.mul_(along_members(1 - lr * self.weight_decay, p))
        else:
            grad = grad + along_members(self.weight_decay, p) * p
        if not state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        step = self.steps + 1
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1, bias_correction2 = 1 - beta1**step, 1 - beta2**step
        denominator = (state["exp_avg_sq"].sqrt() / math.sqrt(bias_correction2)).add_(self.eps)
        p.add_(along_members(-lr / bias_correction1, p) * state["exp_avg"] / denominator)

    def divide_learning_rate(self, members: torch.Tensor, factor: torch.Tensor | float) -> None:
        """Anneal the chosen members' learning rates (a bool mask (P,)) by their `factor` (a column (P,), or one
        number), now and for every later step."""
        self.base_lr = torch.where(members, self.base_lr / factor, self.base_lr)

    def keep(self, members: Sequence[int], params: Tensors) -> None:
        """Only these members go on; `params` are the kept stacked parameters (StackedModel.keep made them)."""
        index = torch.tensor(list(members), device=self.base_lr.device, dtype=torch.long)
        self.kept = index if self.kept is None else self.kept[index]
        self.base_lr, self.weight_decay = self.base_lr[index], self.weight_decay[index]
        self.momentum, self.clip = self.momentum[index], self.clip[index]
        self.state = {
            name: {k: v.index_select(0, index.to(v.device)) for k, v in state.items()}
            for name, state in self.state.items()
        }
        self.params = params

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "schedule_steps": self.schedule_steps,
            "base_lr": self.base_lr.clone(),
            "state": {name: {k: v.clone() for k, v in s.items()} for name, s in self.state.items()},
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.steps, self.base_lr = saved["steps"], saved["base_lr"].to(self.base_lr.device)
        self.schedule_steps = saved.get("schedule_steps", self.steps)
        self.state = {
            name: {k: v.to(self.params[name].device) for k, v in s.items()} for name, s in saved["state"].items()
        }


def leave(models: Sequence[StackedModel], optimizers: Sequence[StackedOptimizer], positions: Sequence[int]) -> None:
    """Only the members at these stack positions go on, in every model and its optimizer."""
    for model, optimizer in zip(models, optimizers, strict=True):
        model.keep(positions)
        optimizer.keep(positions, model.trainable())


def detached(tensors: Tensors) -> Tensors:
    """Copies of stacked tensors for a checkpoint (the stacks go on changing in place)."""
    return {name: tensor.detach().clone() for name, tensor in tensors.items()}


def restore_stacks(saved_models: list[dict], saved_optimizers: list[dict], models, optimizers) -> None:
    """Load a checkpoint's stacked tensors and optimizer states into stacks already cut to its members."""
    pairs = zip(models, saved_models, optimizers, saved_optimizers, strict=True)
    for model, state, optimizer, optimizer_state in pairs:
        with torch.no_grad():
            for name, tensor in {**model.params, **model.buffers}.items():
                tensor.copy_({**state["params"], **state.get("buffers", {})}[name])
        optimizer.load_state_dict(optimizer_state)


# ---------------------------------------------------------------------------------------------- classifiers


def member_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(P,) each member's mean cross-entropy: logits (P, B, C), labels (P, B)."""
    per_example = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")
    return per_example.view(logits.shape[0], -1).mean(1)


def stack_batches(batches: list[dict[str, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
    """One batch per member stacked to (P, B, ...); text batches padded to the longest member's length (padding
    is masked, so a member's logits are those of its own batch)."""
    stacked = {}
    for key in batches[0]:
        tensors = [b[key] for b in batches]
        if tensors[0].dim() == 2 and key != "labels" and len({t.shape[1] for t in tensors}) > 1:
            longest = max(t.shape[1] for t in tensors)
            tensors = [F.pad(t, (0, longest - t.shape[1])) for t in tensors]
        stacked[key] = torch.stack(tensors)
    return to_device(stacked, device)


@torch.no_grad()
def evaluate_pack(model: StackedModel, batches, device, precision) -> tuple[list[float], torch.Tensor]:
    """(each member's accuracy, its predictions (P, examples)) on one split: `evaluate` for a whole pack."""
    model.eval()
    correct, count, predictions = torch.zeros(model.size, dtype=torch.long, device=device), 0, []
    for batch in batches:
        batch = to_device(batch, device)
        with autocast(device, precision):
            logits = model(batch, shared=True)
        predictions.append(logits.argmax(-1))
        correct += (predictions[-1] == batch["labels"]).sum(1)
        count += batch["labels"].numel()
    model.train()
    return [c / count for c in correct.tolist()], torch.cat(predictions, dim=1).cpu()


def check_members_share(configs: Sequence[Any], varies: frozenset[str]) -> None:
    """Members of a pack share every config field but those their job lets vary (the planner groups them so)."""
    shared = [{k: v for k, v in c.model_dump().items() if k not in varies} for c in configs]
    for i, other in enumerate(shared[1:], start=1):
        differing = sorted(k for k in other if other[k] != shared[0][k])
        if differing:
            raise ValueError(f"pack member {i} differs from member 0 in {', '.join(differing)}: they cannot pack")
