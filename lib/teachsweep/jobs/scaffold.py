"""SMaT: Learning to Scaffold (Fernandes et al. 2022), one file, top to bottom.

A frozen teacher T explains its predictions with E_T,phi (a head mix of its attention, or a static explainer).
A student S_theta, initialised from the PRE-TRAINED weights, with its own learnable attention explainer E_S,psi,
learns to simulate T from a few hundred examples:

    L_train = CE(S(x), argmax T(x)) + beta * KL(E_T(x) || E_S(x))

With `explainer: smat`, phi is meta-learned: after each student step, a differentiable look-ahead through the
SAME optimizer update on the same batch gives theta'(phi), and phi follows the gradient of the look-ahead
student's simulation loss on a validation batch (no dropout), with AdamW. (`meta_unroll: student_step`
differentiates through the student's own step instead: as exact, one forward/backward less.) The score of
record is the test simulability (agreement with the teacher on unexplained inputs) of the student with the best
validation simulability (early stopping with patience)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, field_validator
from torch import nn
from torch.func import functional_call

from teachsweep import data, distributed, models, tasks
from teachsweep.explain import registry
from teachsweep.explain.attention import AttentionExplainer, full_precision, head_scores, token_distribution
from teachsweep.jobs import JobSpec
from teachsweep.jobs import teacher as teacher_job
from teachsweep.metrics import subsample_bootstrap_ci
from teachsweep.plausibility import load_rationales, rationale_plausibility
from teachsweep.reporter import Reporter
from teachsweep.training import pearson, pick_device, replay, restore_into, state_of, to_device


class ScaffoldConfig(teacher_job.TeacherReference):
    model_config = ConfigDict(extra="forbid")

    student: str | None = None  # default: the teacher's architecture, from its pre-trained weights
    explainer: str = "smat"
    beta: float | None = Field(None, ge=0)  # default: the explainer's (5 attention, 0.2 gradients)
    normalizer: Literal["sparsemax", "softmax", "entmax15"] = "sparsemax"
    meta_lr: float = Field(5e-4, gt=0)
    # lookahead: the paper's meta step, a look-ahead from the updated student, thrown away. student_step: the
    # meta-gradient of the student's own step (from the student before it), which reuses that step's forward and
    # backward: one forward/backward less per iteration, a different (L2RW-style) unroll point.
    meta_unroll: Literal["lookahead", "student_step"] = "lookahead"
    meta_clip: float = Field(5.0, gt=0)
    student_optimizer: Literal["sgd", "adamw"] = "sgd"
    student_lr: float = Field(5e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    clip_grad_norm: float = Field(5.0, gt=0)
    num_train_examples: int = Field(500, ge=8)
    batch_size: int = Field(32, ge=1)
    max_epochs: int = Field(20, ge=1)
    patience: int = Field(10, ge=1)
    max_eval_examples: int | None = Field(None, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    max_length: int = Field(128, ge=8)
    rationales: str | None = None  # jsonl:<path> or hf:movie_rationales: plausibility of the explanations
    max_rationale_examples: int = Field(200, ge=1)
    ig_steps: int = Field(10, ge=2)
    ig_baseline: Literal["zero", "pad"] = "zero"
    checkpoint_every: int = Field(1, ge=0)  # epochs between checkpoints a restarted trial resumes from; 0: none
    seed: int = 0
    device: str = "auto"

    @field_validator("explainer")
    @classmethod
    def _known_explainer(cls, value: str) -> str:
        registry.explainer_info(value)
        return value


TRANSFORMERS = ("minilm", "tiny-bert", "vit")


def selection_split(params: dict[str, Any]) -> str:
    """SMaT's explainer is meta-trained on the students' validation split, the one its trials are picked on."""
    learnable = registry.explainer_info(params.get("explainer", "smat")).learnable
    return "the validation split, which its explainer is meta-trained on" if learnable else "the validation split"


def metrics(cfg: ScaffoldConfig) -> dict[str, str | None]:
    out: dict[str, str | None] = {
        "simulability/val": "max",
        "simulability/best_val": "max",
        "simulability/test": "max",
        "simulability/test_ci_low": None,
        "simulability/test_ci_high": None,
        "loss/train": "min",
        "loss/meta": "min",
        "explainer/beta": None,
        "best_epoch": None,
    }
    for score in ("acc", "pearson"):
        out |= {f"student/test_{score}": "max", f"teacher/test_{score}": "max"}
    if cfg.rationales and cfg.explainer != "none":
        for who in ("teacher", "student"):
            out |= {f"plausibility/{who}_{k}": "max" for k in ("auc", "ap", "recall_at_k")}
            out |= {f"plausibility/{who}_{k}": None for k in ("n", "rationale_cut_fraction")}
    return out


def check(cfg: ScaffoldConfig) -> None:
    """What only showed inside trials: a teacher or student that is no transformer, an explainer for images on a
    model that cannot give it, a language-modelling teacher. (Teachers given by checkpoint or MLflow run are
    checked once the sweep layer has resolved them.)"""
    if not isinstance(cfg.teacher, dict):
        return
    teacher = teacher_job.TeacherConfig.model_validate(cfg.teacher)
    kind = tasks.task_kind(teacher.task)
    if kind == "lm":
        raise ValueError(f"teacher.task: '{teacher.task}' is language modelling; scaffold simulates classifiers")
    for field, name in (("teacher.model", teacher.model), ("student", cfg.student)):
        if name is not None and models.parse_name(name)[0] in models.KNOWN_MODELS:
            if models.parse_name(name)[0] not in TRANSFORMERS:
                raise ValueError(
                    f"{field}: '{name}' has no attention to explain (scaffold needs minilm, tiny-bert, "
                    "vit or a hub transformer)"
                )
    if kind == "image" and not registry.explainer_info(cfg.explainer).images:
        raise ValueError(f"explainer: '{cfg.explainer}' is not available for image tasks")
    if cfg.student is not None and kind is not None:
        models.validate_model_name(cfg.student, kind)


# ---------------------------------------------------------------------------------------------- losses


def explanation_kl(teacher_probs: torch.Tensor, student_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean_b sum_j m_j p^T_j (log p^T_j - log p^S_j), both clamped to [1e-7, 1 - 1e-7], terms with p^T = 0
    set to 0."""
    p_t = teacher_probs.clamp(1e-7, 1 - 1e-7)
    p_s = student_probs.clamp(1e-7, 1 - 1e-7)
    terms = torch.where(teacher_probs > 0, p_t * (p_t.log() - p_s.log()), torch.zeros_like(p_t))
    return (terms * mask).sum(-1).mean()


def simulation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to the teacher's hard predictions; for a regression teacher (one output), the mean squared
    error to its output."""
    if teacher_logits.size(-1) == 1:
        return F.mse_loss(full_precision(student_logits), full_precision(teacher_logits))
    return F.cross_entropy(full_precision(student_logits), teacher_logits.argmax(-1))


def token_mask(batch: dict, attentions: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """Real tokens: the text attention mask, or every ViT token ([CLS] and patches)."""
    if "attention_mask" in batch:
        return batch["attention_mask"]
    batch_size, tokens = attentions[0].shape[0], attentions[0].shape[-1]
    return torch.ones(batch_size, tokens, dtype=torch.long, device=attentions[0].device)


def with_mask(batch: dict, model) -> dict:
    """Image batches get an all-ones token mask sized by the model's attention (text batches have one)."""
    if "attention_mask" in batch:
        return batch
    with torch.no_grad():
        _, attentions = model.classify(batch, output_attentions=True)
    return batch | {"attention_mask": token_mask(batch, attentions)}


class ExplainedStudent(nn.Module):
    """The student and its explainer as one module, so that one functional_call runs the look-ahead."""

    def __init__(self, student: nn.Module, explainer: AttentionExplainer):
        super().__init__()
        self.student, self.explainer = student, explainer

    def forward(
        self, batch: dict, inputs_embeds: torch.Tensor | None = None, explain: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, explanation scores, or None when `explain` is off); `inputs_embeds` replaces the token ids."""
        logits, attentions = self.student.classify(
            batch, inputs_embeds=inputs_embeds, output_attentions=explain, log_attention=explain
        )
        if not explain:
            return logits, None
        return logits, self.explainer(head_scores(attentions, batch["attention_mask"]), batch["attention_mask"])


def inner_loss(student_out, teacher_logits, teacher_scores, mask, beta: float) -> torch.Tensor:
    logits, student_scores = student_out
    loss = simulation_loss(logits, teacher_logits)
    if teacher_scores is not None and beta > 0:
        loss = loss + beta * explanation_kl(
            token_distribution(teacher_scores, mask), token_distribution(student_scores, mask), mask
        )
    return loss


def lookahead(params, grads, optimizer, cfg: ScaffoldConfig, rows: dict[int, torch.Tensor] | None = None):
    """One differentiable step of the student's own update rule: global-norm clipping, then SGD (or AdamW from
    the optimizer's current moments), with decoupled weight decay.

    `rows` ({param index: row indices}) marks a table (the word embeddings) whose gradient in `grads` covers
    only those rows, every other row's gradient being zero: the step returns the updated rows alone, all that a
    later forward reading only them needs, and the clipping norm is the same as over the whole table."""
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    scale = torch.clamp(cfg.clip_grad_norm / (norm + 1e-6), max=1.0)
    updated = []
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        rows_of_p = rows.get(i) if rows else None
        if rows_of_p is not None:
            p = p[rows_of_p]
        g = g * scale
        if cfg.student_optimizer == "adamw":
            state = optimizer.state.get(params[i], {})
            m, v = state.get("exp_avg", torch.zeros_like(p)), state.get("exp_avg_sq", torch.zeros_like(p))
            if rows_of_p is not None and "exp_avg" in state:
                m, v = m[rows_of_p], v[rows_of_p]
            (beta1, beta2), eps = optimizer.defaults["betas"], optimizer.defaults["eps"]
            step = float(state.get("step", 0)) + 1
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            direction = (m / (1 - beta1**step)) / ((v / (1 - beta2**step) + 1e-16).sqrt() + eps)
        else:
            direction = g
        updated.append(p - cfg.student_lr * (direction + cfg.weight_decay * p))
    return updated


def student_step(params: list[torch.Tensor], optimizer, cfg: ScaffoldConfig) -> None:
    """The real update that `lookahead` mirrors: global-norm clipping, decoupled weight decay, the step."""
    nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
    if cfg.student_optimizer == "sgd" and cfg.weight_decay:
        with torch.no_grad():
            for p in params:
                p.mul_(1 - cfg.student_lr * cfg.weight_decay)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def words_read(*global_batches: dict) -> torch.Tensor | None:
    """The sorted ids of the words the (unsharded, host-side) batches contain, or None for images: the rows of the
    word-embedding table a SMaT step reads. Computed from the global batches every worker draws, so each worker
    finds the same rows without a collective, and on the host, so no device sync waits for `unique`."""
    if "input_ids" not in global_batches[0]:
        return None
    return torch.cat([b["input_ids"].flatten() for b in global_batches]).unique()


def word_rows(model, params: list[torch.Tensor], words: torch.Tensor | None, device: torch.device):
    """(index of the word-embedding table in `params`, `words` on the device) for a text student that trains its
    table; None for images or a frozen table."""
    if words is None:
        return None
    table = model.student.encoder.get_input_embeddings().weight
    index = next((i for i, p in enumerate(params) if p is table), None)
    return None if index is None else (index, words.to(device, non_blocking=True))


class Learner(NamedTuple):
    """The student side of one step: the explained student, its trainable parameters and optimizer, the config,
    and the explanation weight beta."""

    model: nn.Module
    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    cfg: ScaffoldConfig
    beta: float


class Lesson(NamedTuple):
    """One training batch with what the frozen teacher says about it: its logits, and its explanation evidence
    (head scores mixed by phi, static token scores, or None)."""

    batch: dict
    logits: torch.Tensor
    evidence: torch.Tensor | None


class MetaBatch(NamedTuple):
    """A validation batch and the teacher's logits on it: what the explainer's meta loss is measured on; and for
    text, `words_read` of the global training and meta batches (the same on every worker)."""

    batch: dict
    targets: torch.Tensor
    words: torch.Tensor | None = None


class MetaStep(NamedTuple):
    phi_grad: torch.Tensor  # d L_meta / d phi, averaged over workers
    meta_loss: torch.Tensor  # averaged over workers
    loss: torch.Tensor  # this worker's inner loss of the unrolled step
    grads: list[torch.Tensor]  # its gradient averaged over workers, one per student parameter (see `rows`)
    rows: dict[int, torch.Tensor]  # {param index: word-embedding rows its entry of `grads` covers}


def meta_gradient(learner: Learner, teacher_explainer: AttentionExplainer, lesson: Lesson, meta: MetaBatch) -> MetaStep:
    """d L_meta / d phi through one unrolled student update on `batch` from the student's current state (exact
    second order), where L_meta is the updated student's simulation loss on `meta_batch` without dropout.

    The chain rule runs in two stages around g, the inner-loss gradient averaged over workers:
        c = d L_meta / d g                      (the look-ahead takes the averaged step, as the real one does)
        d L_meta / d phi = mean_w (d g_w / d phi)^T c
    Under DDP each worker holds a shard of both batches; functional calls bypass DDP's gradient hooks, so g, c
    and the result are all-reduced here explicitly (no-ops in one process), and every worker ends with the
    meta-gradient of the global meta batch through the global-batch look-ahead.

    The word-embedding table (most of a small encoder's parameters) enters as just the rows the two batches
    read: the others have zero inner gradient and the meta forward never reads them, so this is exact, and it
    spares dense passes over the whole vocabulary in the gradient, its norm, the step and the double backward."""
    model, optimizer, cfg, beta = learner.model, learner.optimizer, learner.cfg, learner.beta
    (batch, t_logits, evidence), (meta_batch, meta_targets, words) = lesson, meta
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    mask = batch["attention_mask"]
    teacher_scores = teacher_explainer(evidence, mask)  # depends on phi
    table = word_rows(model, params, words, mask.device)
    inner_kwargs, rows = {}, {}
    leaves = list(params)
    if table is not None:
        index, row_ids = table
        leaves[index] = params[index].detach()[row_ids].requires_grad_()
        inner_kwargs["inputs_embeds"] = F.embedding(torch.searchsorted(row_ids, batch["input_ids"]), leaves[index])
        rows = {index: row_ids}
    loss = inner_loss(model(batch, **inner_kwargs), t_logits, teacher_scores, mask, beta)
    local_grads = torch.autograd.grad(loss, leaves, create_graph=True)
    grads = [g.requires_grad_() for g in distributed.all_mean_many(local_grads)]
    ahead = dict(zip(names, lookahead(params, grads, optimizer, cfg, rows), strict=True))
    meta_kwargs = {"explain": False}  # logits only: the meta loss does not read the student's explainer
    if table is not None:
        meta_ids = torch.searchsorted(rows[index], meta_batch["input_ids"])
        meta_kwargs["inputs_embeds"] = F.embedding(meta_ids, ahead.pop(names[index]))
    was_training = model.training
    model.eval()
    meta_logits, _ = functional_call(model, ahead, (meta_batch,), meta_kwargs)
    model.train(was_training)
    meta_loss = simulation_loss(meta_logits, meta_targets)
    cotangents = torch.autograd.grad(meta_loss, grads, allow_unused=True, materialize_grads=True)
    cotangents = distributed.all_mean_many(cotangents)
    pairs = [(g, c) for g, c in zip(local_grads, cotangents, strict=True) if g.requires_grad]
    if not pairs:  # nothing in the inner gradient depends on phi (beta = 0 or no explainer in the loss)
        phi_grad = torch.zeros_like(teacher_explainer.phi)
        return MetaStep(phi_grad, distributed.all_mean(meta_loss), loss.detach(), detached(grads), rows)
    (phi_grad,) = torch.autograd.grad(
        [g for g, _ in pairs],
        teacher_explainer.phi,
        grad_outputs=[c for _, c in pairs],
        allow_unused=True,
        materialize_grads=True,
    )
    return MetaStep(
        distributed.all_mean(phi_grad), distributed.all_mean(meta_loss), loss.detach(), detached(grads), rows
    )


def detached(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach() for t in tensors]


def step_with(
    params: list[torch.Tensor], grads: list[torch.Tensor], rows: dict[int, torch.Tensor], optimizer, cfg: ScaffoldConfig
) -> None:
    """The real student step with gradients the meta step computed (a row-gathered table gradient is scattered
    back into the whole table, zero elsewhere, as a backward pass would give it)."""
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        p.grad = torch.zeros_like(p).index_copy_(0, rows[i], g) if i in rows else g.clone()
    student_step(params, optimizer, cfg)


def student_iteration(
    learner: Learner,
    lesson: Lesson,
    teacher_explainer: AttentionExplainer,
    teacher_scores,
    meta: MetaBatch | None = None,
) -> tuple[torch.Tensor, MetaStep | None]:
    """One student step on the lesson and, given a meta batch, the explainer's meta-gradient, in the order
    `cfg.meta_unroll` says. `teacher_scores(evidence, mask)` is the teacher's explanation (its phi mix, or static
    scores). Returns (this worker's inner loss, the MetaStep or None); the caller steps phi."""
    if meta is not None and learner.cfg.meta_unroll == "student_step":
        step = meta_gradient(learner, teacher_explainer, lesson, meta)
        step_with(learner.params, step.grads, step.rows, learner.optimizer, learner.cfg)
        return step.loss, step
    mask = lesson.batch["attention_mask"]
    with torch.no_grad():
        fixed_scores = None if lesson.evidence is None else teacher_scores(lesson.evidence, mask)
    loss = inner_loss(learner.model(lesson.batch), lesson.logits, fixed_scores, mask, learner.beta)
    loss.backward()
    distributed.average_gradients(learner.params)
    student_step(learner.params, learner.optimizer, learner.cfg)
    step = None
    if meta is not None:  # the paper's explainer step: a look-ahead from the updated student
        step = meta_gradient(learner, teacher_explainer, lesson, meta)
    return loss.detach(), step


# ---------------------------------------------------------------------------------------------- training


class TeacherCache:
    """The frozen teacher's logits and explanation evidence for every example of a split, computed once in eval
    batches and kept on the training device (padded to the split's longest example), so that `lookup` is an index
    on the device: no per-row copies from the host on every step."""

    def __init__(self, batches: data.Batches, evidence_of, teacher, device, batch_size: int):
        logits, evidence, order = [], [], []
        for batch in data.eval_batches(batches, batch_size):
            order.append(batch["index"])
            batch = with_mask(to_device(batch, device), teacher)
            batch_logits, batch_evidence = evidence_of(batch)
            logits.append(batch_logits.detach())
            if batch_evidence is not None:  # zero past each example's own length, as a lookup pads
                mask = batch["attention_mask"].to(batch_evidence.dtype)
                shape = (mask.shape[0], *([1] * (batch_evidence.dim() - 2)), mask.shape[-1])
                evidence.append(batch_evidence.detach() * mask.view(shape))
        self.logits = torch.cat(logits)
        longest = max((e.shape[-1] for e in evidence), default=0)
        self.evidence = torch.cat([F.pad(e, (0, longest - e.shape[-1])) for e in evidence]) if evidence else None
        order = torch.cat(order)
        position = torch.empty_like(order)  # example index -> row of the cache
        position[order] = torch.arange(len(order))
        self.position = position.to(device)

    def lookup(self, batch: dict, host_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`host_index`: the batch's example indices as the host batch had them, when the caller has it (it is
        copied over without waiting; else the device batch's own `index` is used)."""
        device = self.position.device  # (image batches carry no attention mask)
        index = (batch["index"] if host_index is None else host_index).to(device, non_blocking=True)
        at = self.position[index]
        if self.evidence is None:
            return self.logits[at], None
        length = batch["attention_mask"].shape[-1]
        evidence = self.evidence[at][..., :length]
        return self.logits[at], F.pad(evidence, (0, length - evidence.shape[-1]))


def transformer_shape(model: nn.Module) -> tuple[int, int]:
    """(layers, heads) of a text encoder or a ViT."""
    config = model.encoder.config if hasattr(model, "encoder") else model.net.config
    if not hasattr(config, "num_attention_heads"):
        raise ValueError("scaffold needs transformer teacher and student models (text encoders or vit)")
    return config.num_hidden_layers, config.num_attention_heads


def make_student_optimizer(params, cfg: ScaffoldConfig):
    if cfg.student_optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.student_lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.student_lr, weight_decay=0.0)  # decay is applied decoupled, below


@torch.no_grad()
def outputs(
    model, teacher, batches, device, cached: TeacherCache | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student outputs, teacher outputs and gold labels on unexplained inputs, over every worker's shard; the
    teacher's logits from `cached` when the split's are (the teacher is frozen)."""
    model.eval()
    student_out, teacher_out, labels = [], [], []
    for batch in batches:
        batch = to_device(distributed.shard(batch), device)
        student_out.append(model(batch)[0].float())
        teacher_out.append((cached.lookup(batch)[0] if cached is not None else teacher(batch)[0]).float())
        labels.append(batch["labels"])
    model.train()  # one copy to the host per output, not one per batch
    return tuple(distributed.gather(torch.cat(t).cpu()) for t in (student_out, teacher_out, labels))


def simulability(student_out, teacher_out, labels) -> tuple[float, float]:
    """(simulability, student score on gold labels): agreement of hard predictions and accuracy, or for a
    regression teacher the Pearson correlations with the teacher's outputs and with the gold targets."""
    if teacher_out.size(-1) == 1:
        return pearson(student_out, teacher_out), pearson(student_out, labels)
    student_pred = student_out.argmax(-1)
    agree = (student_pred == teacher_out.argmax(-1)).float().mean().item()
    return agree, (student_pred == labels).float().mean().item()


@dataclass
class Scaffold:
    """Everything one SMaT run holds: the frozen teacher and its explainer, the student with its own explainer
    and optimizer, the student's data and the teacher's outputs on it (cached), and the best epoch so far."""

    cfg: ScaffoldConfig
    device: torch.device
    task: tasks.Task
    tokenizer: Any
    info: registry.ExplainerInfo
    teacher: nn.Module
    teacher_explainer: AttentionExplainer
    learner: Learner
    meta_optimizer: torch.optim.Optimizer | None
    splits: dict[str, data.Batches]
    stream: Iterator[dict]
    meta_stream: Iterator[dict]
    steps_per_epoch: int
    train_cache: TeacherCache | None = None
    meta_cache: TeacherCache | None = None
    best_val: float = -1.0
    best_epoch: int = 0
    best_state: dict | None = None

    @property
    def student(self) -> nn.Module:
        return self.learner.model.student

    def teacher_evidence(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frozen teacher's logits and what its explanation is made of: head scores (attention explainers,
        mixed by phi later, so the look-ahead can differentiate through the mix) or static token scores."""
        with torch.no_grad():
            explain = self.info.kind == "attention"
            logits, attentions = self.teacher.classify(batch, output_attentions=explain, log_attention=explain)
        if self.info.kind == "attention":
            return logits, head_scores(attentions, batch["attention_mask"])
        if self.info.kind == "static":
            fn = registry.STATIC[self.cfg.explainer][0]
            ig = self.cfg.explainer == "integrated_gradients"
            kwargs = {"steps": self.cfg.ig_steps, "baseline": self.cfg.ig_baseline} if ig else {}
            return logits, fn(self.teacher, batch, **kwargs).detach()
        return logits, None

    def teacher_scores(self, evidence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.teacher_explainer(evidence, mask) if self.info.kind == "attention" else evidence

    def stateful(self) -> dict[str, Any]:
        """What a checkpoint saves and a restarted trial loads, by key."""
        return {
            "student": self.learner.model,
            "optimizer": self.learner.optimizer,
            "teacher_explainer": self.teacher_explainer,
            "meta_optimizer": self.meta_optimizer,
        }

    def keep_best(self) -> None:
        """The best epoch leaves behind the student with its explainer, and the teacher explainer it learned from
        (copies on the CPU)."""
        copy_of = lambda module: {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}  # noqa: E731
        self.best_state = {"model": copy_of(self.learner.model), "teacher_explainer": copy_of(self.teacher_explainer)}


def setup(cfg: ScaffoldConfig) -> Scaffold:
    device = pick_device(cfg.device)
    teacher, teacher_cfg = teacher_job.resolve(cfg.teacher, device)
    task = tasks.load_task(teacher_cfg.task, teacher_cfg.text_column, teacher_cfg.label_column)
    student_name = cfg.student or teacher_cfg.model
    info = registry.explainer_info(cfg.explainer)
    if task.kind == "lm" or (task.kind == "image" and not info.images):
        raise ValueError(f"scaffold: explainer '{cfg.explainer}' is not available for {task.kind} tasks")
    tokenizer = models.load_tokenizer(student_name) if task.kind == "text" else None

    # The student's data: a fixed subset of the training split (the same for every seed).
    splits = {
        "train": data.make_batches(task, "train", tokenizer, cfg.max_length, cfg.num_train_examples),
        "validation": data.make_batches(task, "validation", tokenizer, cfg.max_length, cfg.max_eval_examples),
        "test": data.make_batches(task, "test", tokenizer, cfg.max_length, cfg.max_eval_examples),
    }
    torch.manual_seed(cfg.seed)
    student = models.build_model(student_name, task, models.init_seed(cfg.seed, "student")).to(device).train()
    model = ExplainedStudent(student, AttentionExplainer(*transformer_shape(student), cfg.normalizer)).to(device)
    teacher_explainer = AttentionExplainer(
        *transformer_shape(teacher), cfg.normalizer, layer=info.layer, learnable=info.learnable
    ).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    beta = info.default_beta if cfg.beta is None else cfg.beta
    run = Scaffold(
        cfg,
        device,
        task,
        tokenizer,
        info,
        teacher,
        teacher_explainer,
        Learner(model, params, make_student_optimizer(params, cfg), cfg, beta),
        torch.optim.AdamW([teacher_explainer.phi], lr=cfg.meta_lr, weight_decay=0.0) if info.learnable else None,
        splits,
        data.train_stream(splits["train"], cfg.batch_size, cfg.seed),
        data.train_stream(splits["validation"], cfg.batch_size, cfg.seed + 1),
        max(1, math.ceil(len(splits["train"].split) / cfg.batch_size)),
    )
    # The teacher is frozen: its logits and explanation evidence (head scores, or static token scores) do not
    # depend on phi, so they are computed once per example here and only mixed by phi in the loop.
    run.train_cache = TeacherCache(splits["train"], run.teacher_evidence, teacher, device, cfg.eval_batch_size)
    run.meta_cache = TeacherCache(
        splits["validation"], lambda b: (teacher.classify(b)[0], None), teacher, device, cfg.eval_batch_size
    )
    return run


def train_epoch(run: Scaffold) -> tuple[float, float]:
    """One pass of student steps (and explainer steps for SMaT); (mean inner loss, mean meta loss).

    Under DDP every worker draws the same global batches and trains on its shard; gradients are averaged
    explicitly (the student is not DDP-wrapped: the look-ahead's functional calls would bypass its hooks)."""
    device = run.device
    # inner and meta loss, summed on the device in float64 (as the host sums did), read once per epoch: no host sync
    losses = torch.zeros(2, device=device, dtype=torch.float64)
    for _ in range(run.steps_per_epoch):
        lesson, meta = next_lesson(run)
        loss, step = student_iteration(run.learner, lesson, run.teacher_explainer, run.teacher_scores, meta)
        losses[0] += loss
        if step is not None:
            step_explainer(run, step)
            losses[1] += step.meta_loss.detach()
    world = distributed.world()[1]
    train_loss, meta_loss = (v / world / run.steps_per_epoch for v in distributed.all_sum(losses.tolist(), device))
    return train_loss, meta_loss


def next_lesson(run: Scaffold) -> tuple[Lesson, MetaBatch | None]:
    """This worker's shard of the next training batch with the teacher's cached outputs on it and, when phi is
    meta-learned, of the next meta batch with the teacher's predictions."""
    global_batch = next(run.stream)
    raw = distributed.shard(global_batch)
    batch = with_mask(to_device(raw, run.device), run.teacher)
    meta = None
    if run.meta_optimizer is not None:
        global_meta = next(run.meta_stream)
        raw_meta = distributed.shard(global_meta)
        meta_batch = with_mask(to_device(raw_meta, run.device), run.teacher)
        targets = run.meta_cache.lookup(meta_batch, raw_meta["index"])[0]
        meta = MetaBatch(meta_batch, targets, words_read(global_batch, global_meta))
    return Lesson(batch, *run.train_cache.lookup(batch, raw["index"])), meta


def step_explainer(run: Scaffold, step: MetaStep) -> None:
    """The teacher explainer's step: phi follows its meta-gradient, clipped to a norm of at most `meta_clip`."""
    clip = torch.clamp(run.cfg.meta_clip / (step.phi_grad.norm() + 1e-6), max=1.0)
    run.teacher_explainer.phi.grad = step.phi_grad * clip
    run.meta_optimizer.step()
    run.meta_optimizer.zero_grad(set_to_none=True)


def final_evaluation(run: Scaffold) -> dict[str, float]:
    """The best student, with its own explainer and the teacher explainer of that epoch, on the test split:
    simulability with its CI over test points (500 random halves), accuracy, and plausibility when asked."""
    cfg = run.cfg
    run.learner.model.load_state_dict(run.best_state["model"])
    run.teacher_explainer.load_state_dict(run.best_state["teacher_explainer"])
    test = data.eval_batches(run.splits["test"], cfg.eval_batch_size)
    student_out, teacher_out, labels = outputs(run.student, run.teacher, test, run.device)
    test_sim, student_score = simulability(student_out, teacher_out, labels)
    _, teacher_score = simulability(teacher_out, teacher_out, labels)

    def simulability_of(rows: np.ndarray) -> float:
        return simulability(student_out[rows], teacher_out[rows], labels[rows])[0]

    ci_low, ci_high = subsample_bootstrap_ci(simulability_of, len(labels))
    score = "pearson" if run.task.regression else "acc"
    metrics = {
        "simulability/test": test_sim,
        "simulability/test_ci_low": ci_low,
        "simulability/test_ci_high": ci_high,
        f"student/test_{score}": student_score,
        f"teacher/test_{score}": teacher_score,
        "best_epoch": run.best_epoch,
    }
    if cfg.rationales and run.info.kind != "none" and run.task.kind == "text":
        examples = load_rationales(cfg.rationales, cfg.max_rationale_examples)
        model = run.learner.model.eval()  # the best student with its own explainer, without dropout

        def teacher_explanation(batch: dict) -> torch.Tensor:
            return run.teacher_scores(run.teacher_evidence(batch)[1], batch["attention_mask"])

        for who, scores_of in (("teacher", teacher_explanation), ("student", lambda b: model(b)[1])):
            found = rationale_plausibility(
                examples, run.tokenizer, scores_of, cfg.max_length, cfg.eval_batch_size, run.device
            )
            metrics |= {f"plausibility/{who}_{k}": v for k, v in found.items()}
    return metrics


def train(config: ScaffoldConfig | dict, reporter: Reporter | None = None) -> dict[str, float]:
    cfg = ScaffoldConfig.model_validate(config)
    reporter = reporter or Reporter()
    run = setup(cfg)
    metrics, first_epoch = {}, 1
    saved = reporter.restore()
    if saved is not None:  # a restarted trial: continue after the last checkpointed epoch
        restore_into(saved, run.stateful())
        run.best_val, run.best_epoch, run.best_state = saved["best_val"], saved["best_epoch"], saved["best_student"]
        metrics, first_epoch = saved["metrics"], saved["epoch"] + 1
        replay(run.stream, saved["epoch"] * run.steps_per_epoch)  # the streams are deterministic
        if run.meta_optimizer is not None:
            replay(run.meta_stream, saved["epoch"] * run.steps_per_epoch)
    epoch = first_epoch - 1
    stopped = saved is not None and epoch - run.best_epoch >= cfg.patience  # restarted after its early stop
    for epoch in range(first_epoch, cfg.max_epochs + 1 if not stopped else first_epoch):
        train_loss, meta_loss = train_epoch(run)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"student loss is not finite in epoch {epoch}")
        validation = data.eval_batches(run.splits["validation"], cfg.eval_batch_size)
        val_sim, _ = simulability(*outputs(run.student, run.teacher, validation, run.device, run.meta_cache))
        if val_sim > run.best_val:
            run.best_val, run.best_epoch = val_sim, epoch
            run.keep_best()
        metrics = {
            "simulability/val": val_sim,
            "simulability/best_val": run.best_val,
            "loss/train": train_loss,
            "loss/meta": meta_loss,
            "explainer/beta": run.learner.beta,
        }
        if saved is not None:
            metrics["trial/resumed_from_epoch"] = saved["epoch"]
        checkpoint = None
        if cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0:
            checkpoint = {
                "epoch": epoch,
                "metrics": metrics,
                "best_val": run.best_val,
                "best_epoch": run.best_epoch,
                "best_student": run.best_state,
                **state_of(run.stateful()),
            }
        reporter.report(metrics, epoch, checkpoint=checkpoint)
        if epoch - run.best_epoch >= cfg.patience:
            break

    metrics |= final_evaluation(run)
    reporter.report(metrics, epoch)
    if run.info.kind == "attention":
        log_head_coefficients(run.teacher_explainer, reporter)
    return metrics


def log_head_coefficients(explainer: AttentionExplainer, reporter: Reporter) -> None:
    """The teacher explainer's head mix as JSON and as a layers x heads heatmap."""
    import matplotlib  # heavy, and only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy, and only for the figure

    coefficients = explainer.coefficient_map()
    reporter.log_dict("head_coefficients.json", {"layers_by_heads": coefficients, "normalizer": explainer.normalizer})
    figure, axes = plt.subplots(figsize=(1 + 0.4 * explainer.num_heads, 1 + 0.4 * explainer.num_layers))
    image = axes.imshow(coefficients, cmap="magma", vmin=0)
    axes.set_xlabel("head"), axes.set_ylabel("layer"), figure.colorbar(image)
    reporter.log_figure(figure, "head_coefficients.png")


JOB = JobSpec(
    config=ScaffoldConfig,
    train=train,
    metrics=metrics,
    objective=("simulability/best_val", "max"),
    scores=("simulability/test", "student/test_acc", "student/test_pearson"),
    teacher_fields=("teacher",),
    check=check,
    selection_split=selection_split,
    reference_arm="none",  # every explainer is compared with the unexplained student, paired by seed
)
