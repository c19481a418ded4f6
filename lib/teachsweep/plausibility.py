"""Plausibility of token explanations against human rationales (docs/jobs/scaffold.md): the rationale sources,
word-piece scores made word scores by their max, and per-example ROC-AUC, average precision and recall@k.

Only the words the model saw are ranked: a word cut off by max_length has no score, and ranking it at 0 would
pull every metric down. The fraction of rationale words cut is reported beside the scores."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from teachsweep.explain.attention import token_distribution
from teachsweep.tasks import DataError


def load_rationales(name: str, max_examples: int | None = None) -> list[tuple[list[str], np.ndarray]]:
    """Human rationales as (words, 0/1 mask per word).

    `jsonl:<path>`: one {"words": [...], "rationale": [0/1 per word]} per line.
    `hf:movie_rationales`: ERASER movie reviews; words inside any evidence span are marked."""

    examples: list[tuple[list[str], np.ndarray]] = []
    if name.startswith("jsonl:"):
        path = Path(name[6:])
        if not path.is_file():
            raise DataError(f"rationale file not found: {path}")
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                examples.append((list(row["words"]), np.asarray(row["rationale"], dtype=int)))
    elif name.startswith("hf:"):
        import datasets  # heavy: for the rationale sources that need it only

        split = datasets.load_dataset(name[3:], split="test")
        for row in split:
            words = row["review"].split()
            mask = np.zeros(len(words), dtype=int)
            for evidence in row["evidences"]:
                span = evidence.split()
                for start in range(len(words) - len(span) + 1):
                    if words[start : start + len(span)] == span:
                        mask[start : start + len(span)] = 1
            examples.append((words, mask))
    else:
        raise DataError(f"unknown rationale source '{name}' (jsonl:<path> or hf:movie_rationales)")
    return examples[:max_examples]


def visible_words(word_ids: list[int | None], num_words: int) -> int:
    """How many leading words the model saw: truncation at max_length cuts a suffix of the words (a word whose
    first pieces were kept counts as seen)."""
    seen = [w for w in word_ids if w is not None and w < num_words]
    return max(seen) + 1 if seen else 0


def word_scores(token_scores: np.ndarray, word_ids: list[int | None], num_words: int) -> np.ndarray:
    """A word's score is the largest of its pieces' scores; special tokens (word id None) and padding dropped.

    The max, not the sum: summed, a flat explanation ranks every word split into several pieces above every
    word of one piece (100% of the top-k went to multi-piece words), and a piece count is no evidence. The max
    and the mean both give a flat explanation equal words; the max keeps a word whose evidence sits in one of
    its pieces ("un" of "unfunny") as high as that piece, where the mean would dilute it. Neither is neutral to
    noise: with independent noise on every piece the max favours words of more pieces and the mean words of
    fewer (simulated at rotten_tomatoes' mix of 77/18/5% one/two/three-piece words, k = 5 of 20: 35% and 14%
    of the top-k against a 23% base rate; the sum gave 100% for any flat-ish explanation). A word that got no
    piece (the tokenizer dropped it) ranks last."""
    scores = np.full(num_words, -np.inf)
    for score, word in zip(token_scores, word_ids, strict=False):
        if word is not None and word < num_words:
            scores[word] = max(scores[word], float(score))
    found = np.isfinite(scores)
    lowest = scores[found].min() if found.any() else 0.0
    return np.where(found, scores, lowest - 1.0)


def plausibility(scores: np.ndarray, rationale: np.ndarray) -> dict[str, float] | None:
    """ROC-AUC, average precision and recall@k (k = number of rationale words) of one example's word scores
    against its human rationale mask; None when the mask is all 0 or all 1 (nothing to rank)."""
    from sklearn.metrics import (  # heavy: for the rationale sources that need it only
        average_precision_score,
        roc_auc_score,
    )

    rationale = np.asarray(rationale, dtype=int)
    if rationale.min() == rationale.max():
        return None
    k = int(rationale.sum())
    top_k = np.argsort(-scores, kind="stable")[:k]
    return {
        "auc": float(roc_auc_score(rationale, scores)),
        "ap": float(average_precision_score(rationale, scores)),
        "recall_at_k": float(rationale[top_k].sum() / k),
    }


def mean_plausibility(examples: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Averages over the examples that have something to rank, how many there were, and the fraction of
    rationale words cut off by truncation.

    Each example is (scores of the words the model saw, the full rationale mask): only the seen words are
    ranked, since a word cut off by max_length has no score; an example whose visible rationale is all 0 or
    all 1 is skipped."""
    results, cut, total = [], 0, 0
    for scores, rationale in examples:
        rationale = np.asarray(rationale, dtype=int)
        seen = len(scores)
        cut, total = cut + int(rationale[seen:].sum()), total + int(rationale.sum())
        found = plausibility(np.asarray(scores)[:seen], rationale[:seen])
        if found is not None:
            results.append(found)
    out = {"n": float(len(results)), "rationale_cut_fraction": cut / total if total else 0.0}
    if not results:
        return out
    return {key: float(np.mean([r[key] for r in results])) for key in results[0]} | out


@torch.no_grad()
def rationale_plausibility(
    examples: list[tuple[list[str], np.ndarray]],
    tokenizer,
    scores_of: Callable[[dict], torch.Tensor],
    max_length: int,
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    """Mean plausibility of `scores_of(batch)` (pre-softmax token scores) over rationale examples, tokenized and
    truncated as the model sees them."""
    pairs = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        encoded = tokenizer(
            [w for w, _ in chunk],
            is_split_into_words=True,
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        batch = {k: encoded[k].to(device) for k in ("input_ids", "attention_mask")}
        with torch.enable_grad():  # gradient explainers need autograd even here
            probs = token_distribution(scores_of(batch), batch["attention_mask"]).detach().float().cpu().numpy()
        for row, (words, rationale) in enumerate(chunk):
            word_ids = encoded.word_ids(row)
            seen = visible_words(word_ids, len(words))
            pairs.append((word_scores(probs[row], word_ids, len(words))[:seen], rationale))
    return mean_plausibility(pairs)
