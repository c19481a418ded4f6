"""Relevance explainers: batched equals one-by-one, rollout rows sum to one, padding gets nothing, targets
matter, and running an explainer leaves no trace on later training."""

import numpy as np
import pytest
import torch
from torch import nn

from teachsweep import data, models, tasks
from teachsweep.explain import relevance


def tiny_text_model(pooling="mean", seed=0):
    model = models.build_model("tiny-bert", tasks.load_task("rotten_tomatoes"), seed).eval()
    model.pooling = pooling
    return model


def padded_text_batch(n=6):
    task = tasks.load_task("rotten_tomatoes")
    batches = data.make_batches(task, "validation", models.load_tokenizer("tiny-bert"), 40, 200)
    batch = next(data.eval_batches(batches, 64))
    lengths = batch["attention_mask"].sum(-1)
    order = torch.argsort(lengths)  # short and long examples together: real padding
    pick = torch.cat([order[:3], order[-3:]])[:n]
    return {k: v[pick] for k, v in batch.items()}


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("name", list(relevance.EXPLAINERS))
def test_batched_equals_single_examples_and_padding_gets_nothing(name, pooling):
    model, batch = tiny_text_model(pooling), padded_text_batch()
    explainer = relevance.EXPLAINERS[name]
    batched = explainer(model, batch)
    singles = relevance.single_example_loop(explainer, model, batch)
    assert (batch["attention_mask"] == 0).any()
    for row, single in enumerate(singles):
        length = len(single)
        assert torch.allclose(batched[row, :length], single, atol=1e-5, rtol=1e-4), name
        assert (batched[row, length:] == 0).all()  # padding never gets relevance
        assert (batched[row, :length] >= 0).all()


def test_batched_equals_single_examples_on_a_vit():
    task = tasks.load_task("digits")
    model = models.build_model("vit:2", task, 0).eval()
    batch = next(data.eval_batches(data.make_batches(task, "validation"), 5))
    batched = relevance.generic_rule(model, batch)
    singles = relevance.single_example_loop(relevance.generic_rule, model, batch)
    assert batched.shape == (5, 1 + 16)  # [CLS] + 4x4 patches of 2x2 pixels
    assert all(torch.allclose(batched[i], s, atol=1e-5, rtol=1e-4) for i, s in enumerate(singles))


def test_rollout_rows_sum_to_one():
    model, batch = tiny_text_model(), padded_text_batch()
    _, attentions, _, _ = relevance.target_and_attentions(model, batch, need_grad=False)
    matrix = relevance.rollout_matrix(attentions)
    assert torch.allclose(matrix.sum(-1), torch.ones(matrix.shape[:2]), atol=1e-5)


def test_explanations_for_different_target_classes_differ():
    model, batch = tiny_text_model("cls"), padded_text_batch(4)
    zero = relevance.generic_rule(model, batch, target=torch.zeros(4, dtype=torch.long))
    one = relevance.generic_rule(model, batch, target=torch.ones(4, dtype=torch.long))
    assert not torch.allclose(zero, one)


def test_running_explainers_changes_nothing_global():
    """A model trained after the explainers ran, in the same process, trains exactly as without them."""

    def train_copy(run_explainers: bool) -> list[torch.Tensor]:
        model, batch = tiny_text_model(seed=3), padded_text_batch()
        if run_explainers:
            for explainer in relevance.EXPLAINERS.values():
                explainer(model, batch)
            assert all(p.grad is None for p in model.parameters())
        model.train()
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            loss = nn.functional.cross_entropy(model(batch)[0], batch["labels"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(0)
    without = train_copy(False)
    torch.manual_seed(0)
    with_explainers = train_copy(True)
    assert all(torch.equal(a, b) for a, b in zip(without, with_explainers, strict=True))
    assert nn.LayerNorm.forward is torch.nn.modules.normalization.LayerNorm.forward


class DependsOnOneToken(nn.Module):
    """Predicts class 1 exactly when token position 1 is present (attended), else class 0."""

    def forward(self, batch, state=None):
        present = batch["attention_mask"][:, 1].float()
        return torch.stack([1 - present, present], dim=-1), None


def test_perturbation_curves_reward_the_explanation_that_finds_the_decisive_token():
    from teachsweep.explain import faithfulness

    batch = {
        "input_ids": torch.tensor([[101, 7, 8, 9, 10, 11, 12, 13, 14, 15, 102]] * 4),
        "attention_mask": torch.ones(4, 11, dtype=torch.long),
    }
    right = torch.zeros(4, 11)
    right[:, 1] = 1.0  # all relevance on the decisive token
    wrong = torch.rand(4, 11)
    wrong[:, 1] = -1.0  # the decisive token ranked last
    model = DependsOnOneToken()
    good = faithfulness.perturbation_curves(model, batch, right, {101, 102})
    bad = faithfulness.perturbation_curves(model, batch, wrong, {101, 102})
    assert good["positive"] == [0.0] * 9  # removing the top 10% already flips every prediction
    assert good["negative"] == [1.0] * 9  # removing the least relevant never touches it
    assert faithfulness.auc(good["positive"]) < faithfulness.auc(bad["positive"])
    assert faithfulness.auc(bad["positive"]) == 1.0


@pytest.mark.parametrize(
    ("task", "model", "expected"), [("rotten_tomatoes", "tiny-bert", "grad_x_input"), ("digits", "vit:1", "rollout")]
)
def test_explain_job_scores_every_explainer_and_draws_heatmaps(tmp_path, monkeypatch, task, model, expected):
    from teachsweep.jobs import explain
    from teachsweep.reporter import Reporter

    monkeypatch.setenv("TEACHSWEEP_CACHE", str(tmp_path))
    teacher = dict(task=task, model=model, lr=1e-3, epochs=1, steps_per_epoch=5, max_eval_examples=32, max_length=24)
    reporter = Reporter()
    metrics = explain.train(dict(teacher=teacher, max_examples=24, batch_size=8, max_length=24, heatmaps=2), reporter)
    assert 0.0 <= metrics[f"{expected}/positive_auc"] <= 1.0 and metrics[f"{expected}/ms_per_example"] > 0
    assert f"{expected}_heatmap.png" in reporter.artifacts
    if task == "digits":
        assert 0.0 <= metrics["grad_x_input/positive_auc"] <= 1.0  # gradients of a ViT's [CLS] and patch tokens
    else:
        assert "relevance_tokens.html" in reporter.artifacts
    single = explain.train(dict(teacher=teacher, explainers=["relevance"], max_examples=16, heatmaps=0))
    assert single["faithfulness/positive_auc"] == single["relevance/positive_auc"]


@pytest.mark.parametrize("model_name", ["tiny-bert", "vit:2"])
def test_lrp_re_forward_matches_the_model_and_conserves_relevance_layer_by_layer(model_name):
    from teachsweep.explain import lrp

    task = tasks.load_task("rotten_tomatoes" if model_name == "tiny-bert" else "digits")
    model = models.build_model(model_name, task, 0).eval()
    tok = models.load_tokenizer(model_name) if task.kind == "text" else None
    batch = next(data.eval_batches(data.make_batches(task, "validation", tok, 32, 16), 6))
    logits, _, _ = lrp.trace(model, batch)
    assert torch.allclose(logits, model(batch)[0], atol=1e-5)
    with torch.no_grad():  # the alpha-beta rule conserves relevance when linear layers have no bias
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
    *_, totals, input_relevance, _ = lrp.propagate(model, batch)
    for layer_in, layer_out in totals:
        assert torch.allclose(layer_in, layer_out, rtol=1e-4, atol=1e-5)
    assert torch.allclose(totals[-1][1], torch.ones(6), atol=1e-5)  # starts as the one-hot of the target
    assert torch.allclose(input_relevance.sum(dim=(1, 2)), torch.ones(6), atol=1e-4)


@pytest.mark.parametrize("name", ["lrp", "partial_lrp", "full_lrp"])
def test_lrp_explainers_batched_equal_single_and_ignore_padding(name):
    from teachsweep.explain import lrp

    explainer = getattr(lrp, {"lrp": "lrp_attribution"}.get(name, name))
    model, batch = tiny_text_model(), padded_text_batch()
    batched = explainer(model, batch)
    for row, single in enumerate(relevance.single_example_loop(explainer, model, batch)):
        assert torch.allclose(batched[row, : len(single)], single, atol=1e-5, rtol=1e-3)
        assert (batched[row, len(single) :] == 0).all()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_attention_gradcam_weights_heads_by_the_read_out_row_alone_on_padded_batches(pooling):
    """docs/jobs/explain.md: a head's GradCAM weight is its mean gradient over the read-out row; padded keys (whose
    gradient is not zero) must not enter, so a padded batch gives each example's batch-1 weights and map."""
    model, batch = tiny_text_model(pooling, seed=3), padded_text_batch()
    nonzero = 0
    for target in (torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.long)):
        _, _, grads, mask = relevance.target_and_attentions(model, batch, target)
        weights = relevance.gradcam_head_weights(grads[-1], mask, model)
        batched = relevance.attention_gradcam(model, batch, target)
        for row in range(6):
            length = int(mask[row].sum())
            single = {k: batch[k][row : row + 1, :length] for k in ("input_ids", "attention_mask")}
            _, _, single_grads, _ = relevance.target_and_attentions(model, single, target[row : row + 1])
            g = single_grads[-1][0]  # (H, L, L), no padding
            expected = g[:, 0].mean(-1) if pooling == "cls" else g.mean(dim=(1, 2))
            assert torch.allclose(weights[row], expected, atol=1e-7, rtol=1e-4), (row, weights[row], expected)
            single_map = relevance.attention_gradcam(model, single, target[row : row + 1])[0]
            assert torch.allclose(batched[row, :length], single_map, atol=1e-6, rtol=1e-4)
            nonzero += int((single_map > 0).any())
    assert nonzero > 0, "every GradCAM map was zero: the comparison above would be vacuous"


def test_removing_vit_patches_zeroes_exactly_their_pixels():
    from teachsweep.explain.faithfulness import remove

    pixels = torch.rand(3, 2, 8, 8) + 1.0  # nothing is 0 before removal
    removed = torch.zeros(3, 1 + 16, dtype=torch.bool)  # [CLS] + 4x4 patches of 2x2 pixels
    removed[0, 1 + 5] = removed[2, 1 + 0] = removed[2, 1 + 15] = True
    out = remove({"pixel_values": pixels}, removed, patch_size=2)["pixel_values"]
    expected = pixels.clone()
    for row, token in [(0, 5), (2, 0), (2, 15)]:
        y, x = divmod(token, 4)
        expected[row, :, 2 * y : 2 * y + 2, 2 * x : 2 * x + 2] = 0.0
    assert torch.equal(out, expected) and (out == 0).sum() == 3 * 2 * 4


def decided_by_one_token(pooling: str, seed: int = 0):
    """A 2-layer tiny BERT trained until one token decides its output: [CLS] fillers... [SEP], one position
    holding "good" (label 1) or "bad" (label 0); the fillers are random word pieces. Returns (model, batch of
    fresh examples, the decisive positions)."""
    tokenizer = models.load_tokenizer("tiny-bert")
    good, bad = tokenizer.convert_tokens_to_ids(["good", "bad"])
    generator = torch.Generator().manual_seed(seed)

    def draw(n: int):
        ids = torch.randint(2000, 4000, (n, 10), generator=generator)
        ids[:, 0], ids[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
        position = torch.randint(1, 9, (n,), generator=generator)
        label = torch.randint(0, 2, (n,), generator=generator)
        ids[torch.arange(n), position] = torch.where(label == 1, good, bad)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, label, position

    model = models.build_model("tiny-bert:2", tasks.load_task("rotten_tomatoes"), seed)
    model.pooling = pooling
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        batch, label, _ = draw(32)
        loss = nn.functional.cross_entropy(model(batch)[0], label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    batch, label, position = draw(64)
    assert (model(batch)[0].argmax(-1) == label).float().mean() > 0.95
    return model, batch, position


@pytest.fixture(scope="module", params=["cls", "mean"])
def one_token_model(request):
    return decided_by_one_token(request.param)


@pytest.mark.parametrize("name", ["relevance", "lrp"])
def test_the_relevance_explanation_peaks_on_the_token_that_decides_the_output(one_token_model, name):
    """Read out with the identity, [CLS] took the argmax under cls pooling and a mean-pooled model's
    distribution was near-uniform; R - I over the content tokens puts the mass on the decisive one."""
    from teachsweep.explain import registry
    from teachsweep.explain.attention import token_distribution

    model, batch, position = one_token_model
    probs = token_distribution(registry.explain(name, model, batch), batch["attention_mask"])
    rows = torch.arange(len(position))
    assert (probs.argmax(-1) == position).float().mean() >= 0.75
    assert probs[rows, position].mean() >= 0.25  # uniform over the 8 content tokens would be 0.125
    assert (probs[:, 0] == 0).all() and (probs[:, -1] == 0).all()  # [CLS] and [SEP] are no token of the input
    assert torch.allclose(probs.sum(-1), torch.ones(len(position)))


def test_a_trained_vits_relevance_puts_no_mass_on_cls():
    """On a ViT trained on digits the identity held most of the [CLS] row (71% of the generic rule's mass on
    [CLS] measured at 94.5% accuracy); the explanation is over the patches, and not flat."""
    from teachsweep.explain import registry
    from teachsweep.explain.attention import token_distribution

    task = tasks.load_task("digits")
    model = models.build_model("vit:2", task, 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stream = data.train_stream(data.make_batches(task, "train"), 64, seed=0)
    for _ in range(150):
        batch = next(stream)
        loss = nn.functional.cross_entropy(model(batch)[0], batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    batch = next(data.eval_batches(data.make_batches(task, "validation"), 64))
    assert (model(batch)[0].argmax(-1) == batch["labels"]).float().mean() > 0.6
    tokens = torch.ones(64, 17, dtype=torch.long)
    added = relevance.generic_rule(model, batch)  # the [CLS] row of R - I, patches only
    identity_share = 1 / (1 + added.sum(-1))  # at least this much of R's [CLS] row would have been [CLS]'s
    assert identity_share.mean() > 0.5
    for name in ("relevance", "lrp", "rollout"):
        probs = token_distribution(registry.explain(name, model, batch), tokens)
        assert (probs[:, 0] == 0).all(), name
        assert probs[:, 1:].amax(-1).mean() > 2 / 16, name  # more than twice a flat map's largest patch


def test_explain_job_reports_per_example_paired_differences_of_the_chefer_methods(tmp_path, monkeypatch):
    from teachsweep.explain import faithfulness
    from teachsweep.jobs import explain
    from teachsweep.metrics import t_interval
    from teachsweep.reporter import Reporter

    monkeypatch.setenv("TEACHSWEEP_CACHE", str(tmp_path))
    teacher = dict(task="digits", model="vit:1", lr=1e-3, epochs=1, steps_per_epoch=5, max_eval_examples=32)
    reporter = Reporter()
    explainers = ["raw_attention", "rollout", "relevance"]
    metrics = explain.train(dict(teacher=teacher, explainers=explainers, max_examples=None, heatmaps=0), reporter)
    aucs = reporter.artifacts["example_aucs.json"]
    test_split = tasks.load_task("digits").splits["test"]
    assert {len(aucs[name]["positive"]) for name in explainers} == {len(test_split)}  # the whole split
    for baseline in ("rollout", "raw_attention"):
        for test in ("positive", "negative"):
            differences = np.asarray(aucs["relevance"][test]) - np.asarray(aucs[baseline][test])
            name = f"diff/relevance-{baseline}/{test}_auc"
            assert metrics[name] == pytest.approx(metrics[f"relevance/{test}_auc"] - metrics[f"{baseline}/{test}_auc"])
            assert (metrics[f"{name}_t95_low"], metrics[f"{name}_t95_high"]) == pytest.approx(t_interval(differences))
    assert "diff/lrp-rollout/positive_auc" not in metrics  # a pair is reported only when both were explained
    assert 0.0 <= metrics["teacher/test_acc"] <= 1.0
    kept = torch.tensor([[True] * 9, [True] * 4 + [False] * 5])
    assert faithfulness.example_aucs(kept).tolist() == pytest.approx([1.0, faithfulness.auc([1.0] * 4 + [0.0] * 5)])
