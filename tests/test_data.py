"""Offline tasks: sizes, label sets, deterministic and disjoint splits, clear errors."""

import numpy as np
import pytest
import torch

from teachsweep import data, models, tasks

EXPECTED = {  # name: (total examples after removing exact duplicates, number of classes)
    "rotten_tomatoes": (12_808 - 56, 2),
    "bbc_news": (2_225 - 98, 5),
    "mnist_5k": (5_000, 10),
    "digits": (1_797, 10),
}


@pytest.mark.parametrize("name", EXPECTED)
def test_offline_task_sizes_and_labels(name):
    task = tasks.load_task(name)
    total, classes = EXPECTED[name]
    assert sum(len(task.splits[s]) for s in tasks.SPLITS) == total
    assert task.num_classes == classes
    labels = torch.cat([task.splits[s].labels for s in tasks.SPLITS])
    assert set(labels.tolist()) == set(range(classes))
    train = len(task.splits["train"])
    assert 0.78 * total <= train <= 0.82 * total


def test_rotten_tomatoes_source_has_fresh_7403_rotten_5405_sentences():
    texts, labels = tasks.rotten_tomatoes_source()
    assert (labels == 1).sum() == 7_403 and (labels == 0).sum() == 5_405 and len(texts) == 12_808


def test_splits_are_deterministic_disjoint_and_stratified():
    labels = np.repeat(np.arange(4), [50, 30, 20, 100])
    a = tasks.stratified_split(labels)
    b = tasks.stratified_split(labels)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=False))
    assert not (set(a[0]) & set(a[1]) or set(a[0]) & set(a[2]) or set(a[1]) & set(a[2]))
    assert sum(len(p) for p in a) == len(labels)
    for label, count in zip(range(4), [50, 30, 20, 100], strict=False):
        assert (labels[a[0]] == label).sum() == round(0.8 * count)


def test_real_task_splits_do_not_share_texts():
    task = tasks.load_task("bbc_news")
    train, test = set(task.splits["train"].texts), set(task.splits["test"].texts)
    assert not train & test  # exact duplicates are removed before splitting


def test_language_model_streams():
    task = tasks.load_task("bbc_news_lm")
    assert task.kind == "lm" and task.num_classes == 10_000
    assert len(task.splits["train"]) > 500_000 and task.vocab[0] == "<unk>"
    chunk = next(data.lm_stream(task.splits["train"].tokens, batch_size=4, bptt=10))
    assert chunk["input_ids"].shape == (4, 10)
    assert torch.equal(chunk["input_ids"][:, 1:], chunk["labels"][:, :-1])  # next-token targets
    other = next(data.lm_stream(task.splits["train"].tokens, batch_size=4, bptt=10, start=1234))
    assert not torch.equal(chunk["input_ids"], other["input_ids"])


def test_train_streams_with_different_seeds_differ_and_repeat_per_seed():
    task = tasks.load_task("digits")
    batches = data.make_batches(task, "train")
    a, b, c = (next(data.train_stream(batches, 8, seed))["labels"] for seed in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_text_batches_are_padded_with_a_mask():
    task = tasks.load_task("rotten_tomatoes")
    batches = data.make_batches(task, "validation", models.load_tokenizer("minilm"), max_length=32, max_examples=50)
    batch = next(data.eval_batches(batches, 16))
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[1] <= 32
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()


def test_image_augmentation_keeps_shape_and_changes_pixels():
    images = torch.randn(6, 1, 8, 8)
    out = data.augment_images(images, torch.Generator().manual_seed(0), pad=2, flip=True)
    assert out.shape == images.shape and not torch.equal(out, images)


def test_unknown_task_and_missing_csv_column(tmp_path):
    with pytest.raises(tasks.DataError, match="unknown task 'cifar'"):
        tasks.load_task("cifar")
    csv = tmp_path / "reviews.csv"
    csv.write_text("review,stars\ngreat,5\nbad,1\n")
    with pytest.raises(tasks.DataError, match="column 'text' not in"):
        tasks.load_task(f"csv:{csv}", "text", "stars")
    with pytest.raises(tasks.DataError, match="data file not found"):
        tasks.load_task(f"csv:{tmp_path / 'gone.csv'}", "review", "stars")


def test_csv_task_loads_with_column_mapping(tmp_path):
    csv = tmp_path / "reviews.csv"
    rows = [f"review {i},{'good' if i % 2 else 'bad'}" for i in range(40)]
    csv.write_text("review,verdict\n" + "\n".join(rows) + "\n")
    task = tasks.load_task(f"csv:{csv}", "review", "verdict")
    assert task.label_names == ["bad", "good"] and sum(len(s) for s in task.splits.values()) == 40


def test_unknown_model_is_named():
    with pytest.raises(models.ModelError, match="unknown model 'alexnet'"):
        models.validate_model_name("alexnet")


@pytest.mark.parametrize(
    ("name", "task"),
    [
        ("tiny-bert", "rotten_tomatoes"),
        ("cnn", "digits"),
        ("resnet:8", "digits"),
        ("vit:1", "mnist_5k"),
        ("lstm:1", "bbc_news_lm"),
        ("gpt2:1", "bbc_news_lm"),
    ],
)
def test_models_share_one_calling_convention(name, task):
    task_data = tasks.load_task(task)
    model = models.build_model(name, task_data, seed=0)
    if task_data.kind == "lm":
        batch = next(data.lm_stream(task_data.splits["train"].tokens, 2, 5))
        logits, _ = model(batch)
        assert logits.shape == (2, 5, task_data.num_classes)
    else:
        tok = models.load_tokenizer(name) if task_data.kind == "text" else None
        batch = next(data.eval_batches(data.make_batches(task_data, "validation", tok, 32, 4), 4))
        logits, state = model(batch)
        assert logits.shape == (4, task_data.num_classes) and state is None


def test_minilm_truncation_keeps_pretrained_weights():
    task = tasks.load_task("rotten_tomatoes")
    two = models.build_model("minilm:2", task, seed=0)
    full = models.build_model("minilm", task, seed=1)
    assert two.encoder.config.num_hidden_layers == 2 and full.encoder.config.num_hidden_layers == 6
    assert torch.equal(
        two.encoder.encoder.layer[1].output.dense.weight, full.encoder.encoder.layer[1].output.dense.weight
    )


def test_hf_path_keeps_the_datasets_own_test_split(tmp_path):
    """`hf:<dir>` goes through datasets.load_dataset for real (a local data directory instead of the hub)."""
    folder = tmp_path / "reviews"
    folder.mkdir()
    (folder / "train.csv").write_text("text,label\n" + "\n".join(f"train review {i},{i % 2}" for i in range(50)))
    (folder / "test.csv").write_text("text,label\n" + "\n".join(f"test review {i},{i % 2}" for i in range(10)))
    task = tasks.load_task(f"hf:{folder}")
    assert task.kind == "text" and len(task.splits["test"]) == 10
    assert all(t.startswith("test review") for t in task.splits["test"].texts)
    assert len(task.splits["train"]) + len(task.splits["validation"]) == 50 and 4 <= len(task.splits["validation"]) <= 6


def test_hf_path_running_text_becomes_a_language_modelling_task(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for split, n in (("train", 40), ("validation", 5), ("test", 5)):
        (folder / f"{split}.csv").write_text("text\n" + "\n".join(f"{split} line number {i} ." for i in range(n)))
    task = tasks.load_task(f"hf:{folder}")
    assert task.kind == "lm" and "line" in task.vocab
    assert len(task.splits["test"]) == 5 * 6  # 5 tokens ("test line number i .") + <eos> per line


def test_length_grouped_eval_batches_cover_every_example_once_with_less_padding():
    task = tasks.load_task("rotten_tomatoes")
    batches = data.make_batches(task, "test", models.load_tokenizer("minilm"), 64, 200)
    plain = list(data.eval_batches(batches, 32))
    grouped = list(data.eval_batches(batches, 32, by_length=True))
    assert sorted(torch.cat([b["index"] for b in grouped]).tolist()) == list(range(200))
    for batch in grouped:  # labels and tokens still belong to the examples `index` names
        assert torch.equal(batch["labels"], batches.split.labels[batch["index"]])
    assert sum(b["input_ids"].numel() for b in grouped) < sum(b["input_ids"].numel() for b in plain)
