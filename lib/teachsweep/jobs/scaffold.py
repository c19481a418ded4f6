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
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from torch.func import functional_call

from teachsweep import data, distributed, models
from teachsweep.explain import registry
from teachsweep.explain.attention import AttentionExplainer, full_precision, head_scores, token_distribution
from teachsweep.jobs import teacher as teacher_job
from teachsweep.metrics import subsample_bootstrap_ci
from teachsweep.plausibility import load_rationales, rationale_plausibility
from teachsweep.reporter import Reporter
from teachsweep.training import pearson, pick_device, to_device


class ScaffoldConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    teacher: dict | str = Field(default_factory=dict)  # TeacherConfig fields, a checkpoint dir, or "mlflow:<run>"
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

    @field_validator("teacher")
    @classmethod
    def _valid_teacher(cls, value: dict | str) -> dict | str:
        if isinstance(value, dict):
            teacher_job.TeacherConfig.model_validate(value)
        return value


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
        logits, attentions = self.student.classify(batch, inputs_embeds=inputs_embeds, output_attentions=explain)
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


def word_rows(model, params: list[torch.Tensor], batch: dict, meta_batch: dict):
    """(index of the word-embedding table in `params`, the sorted ids of the rows the two batches read, on every
    worker) for a text student that trains its table; None for images or a frozen table."""
    if "input_ids" not in batch:
        return None
    table = model.student.encoder.get_input_embeddings().weight
    index = next((i for i, p in enumerate(params) if p is table), None)
    if index is None:
        return None
    ids = torch.cat([batch["input_ids"].flatten(), meta_batch["input_ids"].flatten()]).unique()
    return index, distributed.gather(ids).unique().to(ids.device)  # the same rows on every worker


class MetaStep(NamedTuple):
    phi_grad: torch.Tensor  # d L_meta / d phi, averaged over workers
    meta_loss: torch.Tensor  # averaged over workers
    loss: torch.Tensor  # this worker's inner loss of the unrolled step
    grads: list[torch.Tensor]  # its gradient averaged over workers, one per student parameter (see `rows`)
    rows: dict[int, torch.Tensor]  # {param index: word-embedding rows its entry of `grads` covers}


def meta_gradient(
    model, teacher_explainer, optimizer, cfg, beta, batch, t_logits, evidence, meta_batch, meta_targets
) -> MetaStep:
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
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    mask = batch["attention_mask"]
    teacher_scores = teacher_explainer(evidence, mask)  # depends on phi
    table = word_rows(model, params, batch, meta_batch)
    inner_kwargs, rows = {}, {}
    leaves = list(params)
    if table is not None:
        index, row_ids = table
        leaves[index] = params[index].detach()[row_ids].requires_grad_()
        inner_kwargs["inputs_embeds"] = F.embedding(torch.searchsorted(row_ids, batch["input_ids"]), leaves[index])
        rows = {index: row_ids}
    loss = inner_loss(model(batch, **inner_kwargs), t_logits, teacher_scores, mask, beta)
    local_grads = torch.autograd.grad(loss, leaves, create_graph=True)
    grads = [distributed.all_mean(g).requires_grad_() for g in local_grads]
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
    cotangents = [distributed.all_mean(c) for c in cotangents]
    pairs = [(g, c) for g, c in zip(local_grads, cotangents, strict=True) if g.requires_grad]
    if not pairs:  # nothing in the inner gradient depends on phi (beta = 0 or no explainer in the loss)
        phi_grad = torch.zeros_like(teacher_explainer.phi)
        return MetaStep(phi_grad, distributed.all_mean(meta_loss), loss.detach(), detached(grads), rows)
    (phi_grad,) = torch.autograd.grad(
        [g for g, _ in pairs], teacher_explainer.phi, grad_outputs=[c for _, c in pairs], allow_unused=True,
        materialize_grads=True,
    )  # fmt: skip
    return MetaStep(distributed.all_mean(phi_grad), distributed.all_mean(meta_loss), loss.detach(), detached(grads),
                    rows)  # fmt: skip


def detached(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach() for t in tensors]


def step_with(params: list[torch.Tensor], grads: list[torch.Tensor], rows: dict[int, torch.Tensor], optimizer,
              cfg: ScaffoldConfig) -> None:  # fmt: skip
    """The real student step with gradients the meta step computed (a row-gathered table gradient is scattered
    back into the whole table, zero elsewhere, as a backward pass would give it)."""
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        p.grad = torch.zeros_like(p).index_copy_(0, rows[i], g) if i in rows else g.clone()
    student_step(params, optimizer, cfg)


def student_iteration(model, params, optimizer, cfg: ScaffoldConfig, beta, batch, t_logits, evidence,
                      teacher_explainer, teacher_scores, meta_batch=None, meta_targets=None):  # fmt: skip
    """One student step on `batch` and, given a meta batch, the explainer's meta-gradient, in the order
    `cfg.meta_unroll` says. `teacher_scores(evidence, mask)` is the teacher's explanation (its phi mix, or static
    scores). Returns (this worker's inner loss, the MetaStep or None); the caller steps phi."""
    if meta_batch is not None and cfg.meta_unroll == "student_step":
        meta = meta_gradient(model, teacher_explainer, optimizer, cfg, beta, batch, t_logits, evidence, meta_batch,
                             meta_targets)  # fmt: skip
        step_with(params, meta.grads, meta.rows, optimizer, cfg)
        return meta.loss, meta
    mask = batch["attention_mask"]
    with torch.no_grad():
        fixed_scores = None if evidence is None else teacher_scores(evidence, mask)
    loss = inner_loss(model(batch), t_logits, fixed_scores, mask, beta)
    loss.backward()
    distributed.average_gradients(params)
    student_step(params, optimizer, cfg)
    meta = None
    if meta_batch is not None:  # the paper's explainer step: a look-ahead from the updated student
        meta = meta_gradient(model, teacher_explainer, optimizer, cfg, beta, batch, t_logits, evidence, meta_batch,
                             meta_targets)  # fmt: skip
    return loss.detach(), meta


# ---------------------------------------------------------------------------------------------- training


class TeacherCache:
    """The frozen teacher's logits and explanation evidence for every example of a split, computed once in
    eval batches; `lookup` assembles them for a training batch by its `index`, padded to its length."""

    def __init__(self, batches: data.Batches, evidence_of, teacher, device, batch_size: int):
        self.logits: list[torch.Tensor] = []
        self.evidence: list[torch.Tensor | None] = []
        for batch in data.eval_batches(batches, batch_size):
            batch = with_mask(to_device(batch, device), teacher)
            logits, evidence = evidence_of(batch)
            lengths = batch["attention_mask"].sum(-1).tolist()
            for row, length in enumerate(lengths):
                self.logits.append(logits[row].detach().cpu())
                self.evidence.append(None if evidence is None else evidence[row, ..., :length].detach().cpu())

    def lookup(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = batch["index"].tolist()
        device = batch["attention_mask"].device
        logits = torch.stack([self.logits[i] for i in rows]).to(device)
        if self.evidence[rows[0]] is None:
            return logits, None
        first = self.evidence[rows[0]]
        evidence = torch.zeros(len(rows), *first.shape[:-1], batch["attention_mask"].shape[-1], dtype=first.dtype)
        for row, i in enumerate(rows):
            evidence[row, ..., : self.evidence[i].shape[-1]] = self.evidence[i]
        return logits, evidence.to(device)


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
def outputs(model, teacher, batches, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student outputs, teacher outputs and gold labels on unexplained inputs, over every worker's shard."""
    model.eval()
    student_out, teacher_out, labels = [], [], []
    for batch in batches:
        batch = to_device(distributed.shard(batch), device)
        student_out.append(model(batch)[0].float().cpu())
        teacher_out.append(teacher(batch)[0].float().cpu())
        labels.append(batch["labels"].cpu())
    model.train()
    return tuple(distributed.gather(torch.cat(t)) for t in (student_out, teacher_out, labels))


def simulability(student_out, teacher_out, labels) -> tuple[float, float]:
    """(simulability, student score on gold labels): agreement of hard predictions and accuracy, or for a
    regression teacher the Pearson correlations with the teacher's outputs and with the gold targets."""
    if teacher_out.size(-1) == 1:
        return pearson(student_out, teacher_out), pearson(student_out, labels)
    student_pred = student_out.argmax(-1)
    agree = (student_pred == teacher_out.argmax(-1)).float().mean().item()
    return agree, (student_pred == labels).float().mean().item()


def best_epoch_state(model: ExplainedStudent, teacher_explainer: AttentionExplainer) -> dict:
    """What the best epoch leaves behind: the student with its explainer, and the teacher explainer it learned
    from (copies on the CPU)."""
    copy_of = lambda module: {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}  # noqa: E731
    return {"model": copy_of(model), "teacher_explainer": copy_of(teacher_explainer)}


def train(config: ScaffoldConfig | dict, reporter: Reporter | None = None) -> dict[str, float]:
    cfg = ScaffoldConfig.model_validate(config)
    reporter = reporter or Reporter()
    device = pick_device(cfg.device)
    teacher, teacher_cfg = teacher_job.resolve(cfg.teacher, device)
    task = data.load_task(teacher_cfg.task, teacher_cfg.text_column, teacher_cfg.label_column)
    student_name = cfg.student or teacher_cfg.model
    info = registry.explainer_info(cfg.explainer)
    if task.kind == "lm" or (task.kind == "image" and not info.images):
        raise ValueError(f"scaffold: explainer '{cfg.explainer}' is not available for {task.kind} tasks")
    tokenizer = models.load_tokenizer(student_name) if task.kind == "text" else None
    beta = info.default_beta if cfg.beta is None else cfg.beta

    # The student's data: a fixed subset of the training split (the same for every seed).
    train_batches = data.make_batches(task, "train", tokenizer, cfg.max_length, cfg.num_train_examples)
    val_batches = data.make_batches(task, "validation", tokenizer, cfg.max_length, cfg.max_eval_examples)
    test_batches = data.make_batches(task, "test", tokenizer, cfg.max_length, cfg.max_eval_examples)
    stream = data.train_stream(train_batches, cfg.batch_size, cfg.seed)
    meta_stream = data.train_stream(val_batches, cfg.batch_size, cfg.seed + 1)

    torch.manual_seed(cfg.seed)
    student = models.build_model(student_name, task, models.init_seed(cfg.seed, "student")).to(device).train()
    layers, heads = transformer_shape(student)
    model = ExplainedStudent(student, AttentionExplainer(layers, heads, cfg.normalizer)).to(device)
    t_layers, t_heads = transformer_shape(teacher)
    teacher_explainer = AttentionExplainer(
        t_layers, t_heads, cfg.normalizer, layer=info.layer, learnable=info.learnable
    ).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_student_optimizer(params, cfg)
    meta_optimizer = (
        torch.optim.AdamW([teacher_explainer.phi], lr=cfg.meta_lr, weight_decay=0.0) if info.learnable else None
    )

    def teacher_evidence(batch):
        """The frozen teacher's logits and what its explanation is made of: head scores (attention explainers,
        mixed by phi later, so the look-ahead can differentiate through the mix) or static token scores."""
        with torch.no_grad():
            logits, attentions = teacher.classify(batch, output_attentions=info.kind == "attention")
        if info.kind == "attention":
            return logits, head_scores(attentions, batch["attention_mask"])
        if info.kind == "static":
            fn = registry.STATIC[cfg.explainer][0]
            ig = cfg.explainer == "integrated_gradients"
            kwargs = {"steps": cfg.ig_steps, "baseline": cfg.ig_baseline} if ig else {}
            return logits, fn(teacher, batch, **kwargs).detach()
        return logits, None

    def teacher_scores(evidence, mask):
        return teacher_explainer(evidence, mask) if info.kind == "attention" else evidence

    # The teacher is frozen: its logits and explanation evidence (head scores, or static token scores) do not
    # depend on phi, so they are computed once per example here and only mixed by phi in the loop.
    train_cache = TeacherCache(train_batches, teacher_evidence, teacher, device, cfg.eval_batch_size)
    meta_cache = TeacherCache(val_batches, lambda b: (teacher.classify(b)[0], None), teacher, device,
                              cfg.eval_batch_size)  # fmt: skip

    steps_per_epoch = max(1, math.ceil(len(train_batches.split) / cfg.batch_size))
    best_val, best_epoch, best_state, metrics, first_epoch = -1.0, 0, None, {}, 1
    saved = reporter.restore()
    if saved is not None:  # a restarted trial: continue after the last checkpointed epoch
        model.load_state_dict(saved["student"])
        optimizer.load_state_dict(saved["optimizer"])
        teacher_explainer.load_state_dict(saved["teacher_explainer"])
        if meta_optimizer is not None:
            meta_optimizer.load_state_dict(saved["meta_optimizer"])
        best_val, best_epoch, best_state = saved["best_val"], saved["best_epoch"], saved["best_student"]
        metrics, first_epoch = saved["metrics"], saved["epoch"] + 1
        for _ in range(saved["epoch"] * steps_per_epoch):  # the streams are deterministic: replay them
            next(stream)
            if meta_optimizer is not None:
                next(meta_stream)
    # Under DDP every worker draws the same global batches and trains on its shard; gradients are averaged
    # explicitly (the student is not DDP-wrapped: the look-ahead's functional calls would bypass its hooks).
    world = distributed.world()[1]
    epoch = first_epoch - 1
    stopped = saved is not None and epoch - best_epoch >= cfg.patience  # restarted after its early stop
    for epoch in range(first_epoch, cfg.max_epochs + 1 if not stopped else first_epoch):
        train_loss = meta_loss_sum = 0.0
        for _ in range(steps_per_epoch):
            batch = with_mask(to_device(distributed.shard(next(stream)), device), teacher)
            t_logits, evidence = train_cache.lookup(batch)
            meta_batch = meta_targets = None
            if meta_optimizer is not None:
                meta_batch = with_mask(to_device(distributed.shard(next(meta_stream)), device), teacher)
                meta_targets = meta_cache.lookup(meta_batch)[0]
            loss, meta = student_iteration(model, params, optimizer, cfg, beta, batch, t_logits, evidence,
                                           teacher_explainer, teacher_scores, meta_batch, meta_targets)  # fmt: skip
            train_loss += loss.item()
            if meta is not None:
                clip = torch.clamp(cfg.meta_clip / (meta.phi_grad.norm() + 1e-6), max=1.0)
                teacher_explainer.phi.grad = meta.phi_grad * clip
                meta_optimizer.step()
                meta_optimizer.zero_grad(set_to_none=True)
                meta_loss_sum += meta.meta_loss.item()
        train_loss, meta_loss_sum = (v / world for v in distributed.all_sum([train_loss, meta_loss_sum], device))
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"student loss is not finite in epoch {epoch}")

        val_sim, _ = simulability(
            *outputs(student, teacher, data.eval_batches(val_batches, cfg.eval_batch_size), device)
        )
        if val_sim > best_val:
            best_val, best_epoch = val_sim, epoch
            best_state = best_epoch_state(model, teacher_explainer)
        metrics = {
            "simulability/val": val_sim,
            "simulability/best_val": best_val,
            "loss/train": train_loss / steps_per_epoch,
            "loss/meta": meta_loss_sum / steps_per_epoch,
            "explainer/beta": beta,
        }
        if saved is not None:
            metrics["trial/resumed_from_epoch"] = saved["epoch"]
        checkpoint = None
        if cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0:
            checkpoint = {
                "epoch": epoch, "metrics": metrics, "best_val": best_val, "best_epoch": best_epoch,
                "best_student": best_state,
                "student": model.state_dict(), "optimizer": optimizer.state_dict(),
                "teacher_explainer": teacher_explainer.state_dict(),
                **({"meta_optimizer": meta_optimizer.state_dict()} if meta_optimizer is not None else {}),
            }  # fmt: skip
        reporter.report(metrics, epoch, checkpoint=checkpoint)
        if epoch - best_epoch >= cfg.patience:
            break

    # The best student is evaluated together with its own explainer and the teacher explainer of that epoch.
    model.load_state_dict(best_state["model"])
    teacher_explainer.load_state_dict(best_state["teacher_explainer"])
    student_out, teacher_out, labels = outputs(
        student, teacher, data.eval_batches(test_batches, cfg.eval_batch_size), device
    )
    test_sim, student_score = simulability(student_out, teacher_out, labels)
    _, teacher_score = simulability(teacher_out, teacher_out, labels)

    def simulability_of(rows: np.ndarray) -> float:
        return simulability(student_out[rows], teacher_out[rows], labels[rows])[0]

    ci_low, ci_high = subsample_bootstrap_ci(simulability_of, len(labels))
    score = "pearson" if task.regression else "acc"
    metrics |= {"simulability/test": test_sim, "simulability/test_ci_low": ci_low, "simulability/test_ci_high": ci_high,
                f"student/test_{score}": student_score, f"teacher/test_{score}": teacher_score,
                "best_epoch": best_epoch}  # fmt: skip
    if cfg.rationales and info.kind != "none" and task.kind == "text":
        examples = load_rationales(cfg.rationales, cfg.max_rationale_examples)
        model.eval()  # the best student with its own explainer, without dropout
        for who, scores_of in (("teacher", lambda b: teacher_scores(teacher_evidence(b)[1], b["attention_mask"])),
                               ("student", lambda b: model(b)[1])):  # fmt: skip
            found = rationale_plausibility(examples, tokenizer, scores_of, cfg.max_length, cfg.eval_batch_size, device)
            metrics |= {f"plausibility/{who}_{k}": v for k, v in found.items()}
    reporter.report(metrics, epoch)
    if info.kind == "attention":
        log_head_coefficients(teacher_explainer, reporter)
    return metrics


def log_head_coefficients(explainer: AttentionExplainer, reporter: Reporter) -> None:
    """The teacher explainer's head mix as JSON and as a layers x heads heatmap."""
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coefficients = explainer.coefficient_map()
    reporter.log_dict("head_coefficients.json", {"layers_by_heads": coefficients, "normalizer": explainer.normalizer})
    figure, axes = plt.subplots(figsize=(1 + 0.4 * explainer.num_heads, 1 + 0.4 * explainer.num_layers))
    image = axes.imshow(coefficients, cmap="magma", vmin=0)
    axes.set_xlabel("head"), axes.set_ylabel("layer"), figure.colorbar(image)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "head_coefficients.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        reporter.log_file(path)
