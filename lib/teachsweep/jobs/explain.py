"""Explain job: compute and evaluate every explainer of a frozen teacher on one split.

Per explainer: faithfulness (positive and negative perturbation AUC), plausibility against human rationales when
given, and milliseconds per explanation (batched). Per pair in `paired` (by default each Chefer method against
rollout and raw attention): the mean per-example AUC difference with its paired Student-t 95% interval over the
examples (`diff/<a>-<b>/<test>_auc`, `..._t95_low`, `..._t95_high`); over teachers, a sweep's seeds give the t
interval of these means. Artifacts: every example's AUCs (`example_aucs.json`), token heatmaps (HTML and PNG)
for a few text examples, or patch heatmaps overlaid on the image for a ViT."""

from __future__ import annotations

import html
import tempfile
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field, field_validator

from teachsweep import data, models, tasks
from teachsweep.explain import faithfulness, registry
from teachsweep.explain.attention import token_distribution
from teachsweep.jobs import JobSpec
from teachsweep.jobs import teacher as teacher_job
from teachsweep.metrics import t_interval
from teachsweep.plausibility import load_rationales, rationale_plausibility
from teachsweep.reporter import Reporter
from teachsweep.training import pick_device, synchronize, to_device

DEFAULT_EXPLAINERS = [
    "raw_attention",
    "rollout",
    "attention_gradcam",
    "relevance",
    "lrp",
    "partial_lrp",
    "full_lrp",
    "attention",
    "grad_x_input",
    "integrated_gradients",
]
SPLIT_NAMES = {"validation": "val", "test": "test"}
CHEFER_PAIRS = [["relevance", "rollout"], ["relevance", "raw_attention"], ["lrp", "rollout"], ["lrp", "raw_attention"]]


class ExplainConfig(teacher_job.TeacherReference):
    model_config = ConfigDict(extra="forbid")

    explainers: list[str] = Field(default_factory=lambda: list(DEFAULT_EXPLAINERS), min_length=1)
    split: Literal["validation", "test"] = "test"
    max_examples: int | None = Field(256, ge=1)  # None: the whole split
    # explainer pairs (a, b) whose per-example AUC differences a - b are reported; default: each Chefer method
    # against rollout and raw attention, where both are explained
    paired: list[tuple[str, str]] | None = None
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(128, ge=8)
    rationales: str | None = None
    heatmaps: int = Field(4, ge=0)
    seed: int = 0  # picks which examples are explained
    device: str = "auto"

    @field_validator("explainers")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        for name in names:
            info = registry.explainer_info(name)
            if info.kind == "none" or info.learnable:
                raise ValueError(f"explainer '{name}' cannot explain a model on its own")
        return names

    def pairs(self) -> list[tuple[str, str]]:
        wanted = self.paired if self.paired is not None else [tuple(p) for p in CHEFER_PAIRS]
        return [(a, b) for a, b in wanted if a in self.explainers and b in self.explainers]


def selection_split(params: dict) -> str:
    """The explained split picks the best explainer: the explain job has no held-out split to check it on."""
    return f"the {params.get('split', 'test')} split it explains (no held-out split checks the pick)"


def metrics(cfg: ExplainConfig) -> dict[str, str | None]:
    """Per explainer: perturbation AUCs (positive: lower is better), speed, plausibility with rationales; with a
    single explainer the same under `faithfulness/` too."""
    out: dict[str, str | None] = {f"teacher/{SPLIT_NAMES[cfg.split]}_acc": "max"}
    prefixes = [f"{name}/" for name in cfg.explainers] + (["faithfulness/"] if len(cfg.explainers) == 1 else [])
    for prefix in prefixes:
        out |= {f"{prefix}positive_auc": "min", f"{prefix}negative_auc": "max", f"{prefix}ms_per_example": "min"}
    for a, b in cfg.pairs():
        for test, mode in (("positive", "min"), ("negative", "max")):
            name = f"diff/{a}-{b}/{test}_auc"
            out |= {name: mode, f"{name}_t95_low": None, f"{name}_t95_high": None}
    for prefix in prefixes:
        if cfg.rationales:
            out |= {f"{prefix}plausibility_{k}": "max" for k in ("auc", "ap", "recall_at_k")}
            out |= {f"{prefix}plausibility_{k}": None for k in ("n", "rationale_cut_fraction")}
    return out


def train(config: ExplainConfig | dict, reporter: Reporter | None = None) -> dict[str, float]:
    cfg = ExplainConfig.model_validate(config)
    reporter = reporter or Reporter()
    device = pick_device(cfg.device)
    model, teacher_cfg = teacher_job.resolve(cfg.teacher, device)
    task = tasks.load_task(teacher_cfg.task, teacher_cfg.text_column, teacher_cfg.label_column)
    tokenizer = models.load_tokenizer(teacher_cfg.model) if task.kind == "text" else None
    split = tasks.subset(task.splits[cfg.split], cfg.max_examples, seed=cfg.seed)
    part = data.Batches(task, split, None, 0)
    if tokenizer is not None:
        part = data.Batches(
            task, split, data.tokenize_split(split.texts, tokenizer, cfg.max_length), tokenizer.pad_token_id
        )
    special = set(getattr(model, "special_ids", ())) if tokenizer else set()  # [UNK] stands for a word: it stays
    patch = getattr(getattr(model, "net", None), "config", None)
    patch_size = getattr(patch, "patch_size", None)

    metrics: dict[str, float] = {f"teacher/{SPLIT_NAMES[cfg.split]}_acc": accuracy(model, part, cfg, device)}
    per_example: dict[str, dict[str, np.ndarray]] = {}
    for name in cfg.explainers:
        info = registry.explainer_info(name)
        if task.kind == "image" and not info.images:
            continue
        seconds, count, kept = 0.0, 0, {"positive": [], "negative": []}
        shown = []
        for batch in data.eval_batches(part, cfg.batch_size, by_length=True):
            batch = to_device(batch, device)
            synchronize(device)
            start = time.perf_counter()
            scores = registry.explain(name, model, batch)
            synchronize(device)
            seconds += time.perf_counter() - start
            mask = batch.get("attention_mask", torch.ones_like(scores, dtype=torch.long))
            probs = token_distribution(scores, mask).detach()
            batch_kept = faithfulness.kept_predictions(model, batch, probs, special, patch_size)
            for test in kept:
                kept[test].append((batch["index"].cpu(), batch_kept[test].cpu()))
            count += len(probs)
            if len(shown) < cfg.heatmaps:
                shown += [(batch, probs, row) for row in range(min(len(probs), cfg.heatmaps - len(shown)))]
        per_example[name] = {}
        for test in ("positive", "negative"):
            index = torch.cat([i for i, _ in kept[test]])
            values = torch.cat([k for _, k in kept[test]])[torch.argsort(index)]  # in example order
            metrics[f"{name}/{test}_auc"] = faithfulness.auc(values.float().mean(0).tolist())
            per_example[name][test] = faithfulness.example_aucs(values)
        metrics[f"{name}/ms_per_example"] = 1000 * seconds / count
        if cfg.rationales and task.kind == "text":
            examples = load_rationales(cfg.rationales, cfg.max_examples)
            found = rationale_plausibility(
                examples,
                tokenizer,
                lambda b, name=name: registry.explain(name, model, b),
                cfg.max_length,
                cfg.batch_size,
                device,
            )
            metrics |= {f"{name}/plausibility_{k}": v for k, v in found.items()}
        if shown:
            log_heatmaps(name, shown, tokenizer, patch_size, reporter)
    metrics |= paired_differences(per_example, cfg.pairs())
    reporter.log_dict("example_aucs.json", {n: {t: v.tolist() for t, v in d.items()} for n, d in per_example.items()})
    if len(cfg.explainers) == 1:  # one explainer per trial (explainer x seeds sweeps): unprefixed names too
        prefix = f"{cfg.explainers[0]}/"
        metrics |= {f"faithfulness/{k.removeprefix(prefix)}": v for k, v in list(metrics.items())}
    reporter.report(metrics, 1)
    return metrics


@torch.no_grad()
def accuracy(model, part: data.Batches, cfg: ExplainConfig, device: torch.device) -> float:
    """The teacher's accuracy on the explained examples (what its explanations are explanations of)."""
    model.eval()
    correct = total = 0
    for batch in data.eval_batches(part, cfg.batch_size, by_length=True):
        batch = to_device(batch, device)
        correct += int((model(batch)[0].argmax(-1) == batch["labels"]).sum())
        total += len(batch["labels"])
    return correct / total


def paired_differences(per_example: dict[str, dict[str, np.ndarray]], pairs) -> dict[str, float]:
    """Mean per-example AUC difference a - b and its paired Student-t 95% interval over the examples."""
    out = {}
    for a, b in pairs:
        if a not in per_example or b not in per_example:  # (an explainer the task cannot use)
            continue
        for test in ("positive", "negative"):
            differences = per_example[a][test] - per_example[b][test]
            low, high = t_interval(differences)
            name = f"diff/{a}-{b}/{test}_auc"
            out |= {name: float(differences.mean()), f"{name}_t95_low": low, f"{name}_t95_high": high}
    return out


def special_mask(batch: dict, row: int, length: int, tokenizer) -> torch.Tensor:
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    ids = batch["input_ids"][row, :length]
    return torch.isin(ids, torch.tensor(sorted(special), dtype=ids.dtype, device=ids.device))


def log_heatmaps(name: str, shown, tokenizer, patch_size, reporter: Reporter) -> None:
    import matplotlib  # heavy, and only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy, and only for the figure

    with tempfile.TemporaryDirectory() as tmp:
        if tokenizer is not None:
            rows = []
            for batch, probs, row in shown:
                length = int(batch["attention_mask"][row].sum())
                tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][row, :length].tolist())
                # specials are no input word (never ranked or removed): unshaded, so they cannot wash out the rest
                weights = (probs[row, :length] * (~special_mask(batch, row, length, tokenizer))).cpu().numpy()
                weights = weights / max(weights.max(), 1e-12)
                rows.append(
                    " ".join(
                        f'<span style="background: rgba(255,0,0,{w:.2f})">{html.escape(t)}</span>'
                        for t, w in zip(tokens, weights, strict=True)
                    )
                )
            page = Path(tmp) / f"{name}_tokens.html"
            page.write_text(f"<html><body><h3>{name}</h3><p>" + "</p><p>".join(rows) + "</p></body></html>")
            reporter.log_file(page)
            figure, axes = plt.subplots(len(shown), 1, figsize=(10, 0.9 * len(shown)), squeeze=False)
            for axis, (batch, probs, row) in zip(axes[:, 0], shown, strict=True):
                length = int(batch["attention_mask"][row].sum())
                tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][row, :length].tolist())
                shown_weights = probs[row, :length] * (~special_mask(batch, row, length, tokenizer))
                axis.imshow(shown_weights.cpu().numpy()[None], cmap="Reds", aspect="auto")
                axis.set_xticks(range(length), tokens, rotation=90, fontsize=6)
                axis.set_yticks([])
        else:
            figure, axes = plt.subplots(1, len(shown), figsize=(2.2 * len(shown), 2.4), squeeze=False)
            for axis, (batch, probs, row) in zip(axes[0], shown, strict=True):
                image = batch["pixel_values"][row].mean(0).cpu().numpy()
                grid = image.shape[-1] // patch_size
                patches = probs[row, 1:].cpu().numpy().reshape(grid, grid)
                axis.imshow(image, cmap="gray")
                axis.imshow(np.kron(patches, np.ones((patch_size, patch_size))), cmap="jet", alpha=0.5)
                axis.axis("off")
        figure.suptitle(name)
        reporter.log_figure(figure, f"{name}_heatmap.png")


JOB = JobSpec(
    config=ExplainConfig,
    train=train,
    metrics=metrics,
    objective=("faithfulness/negative_auc", "max"),
    scores=(),
    teacher_fields=("teacher",),
    selection_split=selection_split,
    single_process=True,  # it trains nothing: one process
)
