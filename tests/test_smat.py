"""SMaT: attention explainer, losses, the look-ahead update, the meta-gradient, static explainers, teachers."""

import copy
import math

import numpy as np
import pytest
import torch
from small_jobs import small_scaffold_job, tiny_bert_teacher, vit_digits_teacher
from torch import nn

from teachsweep import data, models, tasks
from teachsweep.explain import gradient
from teachsweep.explain.attention import AttentionExplainer, head_scores, token_distribution
from teachsweep.jobs import scaffold
from teachsweep.jobs import teacher as teacher_job
from teachsweep.reporter import Reporter


def tiny_bert(seed=0, dropout=False):
    model = models.build_model("tiny-bert", tasks.load_task("rotten_tomatoes"), seed)
    if not dropout:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    return model


def text_batch(n=4, length=24):
    task = tasks.load_task("rotten_tomatoes")
    batches = data.make_batches(task, "validation", models.load_tokenizer("tiny-bert"), length, 64)
    return next(data.train_stream(batches, n, seed=3))


def test_log_attention_gives_the_same_explanation_as_pre_softmax_scores():
    torch.manual_seed(0)
    B, L, H, n = 2, 2, 3, 5
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    z = torch.randn(B, L, H, n, n) * 3
    bias = (1 - mask)[:, None, None, None, :] * -1e9
    attentions = tuple(torch.log_softmax(z[:, layer] + bias[:, 0], dim=-1) for layer in range(L))
    explainer = AttentionExplainer(L, H, "sparsemax")
    with torch.no_grad():
        explainer.phi.copy_(torch.tensor([0.5, 0.1, 0.0, 0.3, 0.2, 0.4]))
    from_log_a = token_distribution(explainer(head_scores(attentions, mask), mask), mask)
    rows = mask.float() / mask.sum(-1, keepdim=True)
    from_z = torch.einsum("bkij,bi->bkj", z.flatten(1, 2), rows)
    expected = token_distribution(explainer(from_z, mask), mask)
    assert torch.allclose(from_log_a, expected, atol=1e-5)
    assert (from_log_a[1, 3:] == 0).all()  # padding never gets probability


def test_head_coefficients_start_uniform_and_layer_restriction_zeroes_other_layers():
    explainer = AttentionExplainer(3, 4, "sparsemax")
    assert torch.allclose(explainer.coefficients(), torch.full((12,), 1 / 12))
    last = AttentionExplainer(3, 4, "sparsemax", layer=-1, learnable=False)
    coefficients = last.coefficients().view(3, 4)
    assert torch.allclose(coefficients[2], torch.full((4,), 0.25)) and (coefficients[:2] == 0).all()
    assert not last.phi.requires_grad
    one_head = AttentionExplainer(3, 4, "softmax", head=5).coefficients().detach()
    assert one_head[5] == pytest.approx(1.0) and one_head.sum() == pytest.approx(1.0)


def test_explanation_kl_matches_a_hand_computation_and_ignores_padding():
    p_t = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    p_s = torch.tensor([[0.25, 0.75, 0.0], [0.2, 0.3, 0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    by_hand = (0.5 * torch.log(torch.tensor(0.5 / 0.25)) + 0.5 * torch.log(torch.tensor(0.5 / 0.75))) / 2
    assert scaffold.explanation_kl(p_t, p_s, mask).item() == pytest.approx(by_hand.item(), rel=1e-4)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_lookahead_is_the_same_update_as_the_real_optimizer(optimizer):
    cfg = scaffold.ScaffoldConfig(student_optimizer=optimizer, student_lr=0.05, weight_decay=0.1, clip_grad_norm=0.5)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    params = list(net.parameters())
    opt = scaffold.make_student_optimizer(params, cfg)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for _ in range(2):  # a step first, so AdamW has moments
        nn.functional.cross_entropy(net(x), y).backward()
        scaffold.student_step(params, opt, cfg)
    grads = torch.autograd.grad(nn.functional.cross_entropy(net(x), y), params)
    predicted = [p.detach() for p in scaffold.lookahead(params, grads, opt, cfg)]
    # The word-embedding path: a table whose gradient is zero outside some rows gets the gradient of those rows
    # alone, and the step returns those rows as the whole-table step would update them (same clipping norm).
    some_rows = torch.tensor([1, 5, 6])
    sparse = [grads[0] * torch.isin(torch.arange(8), some_rows)[:, None], *grads[1:]]
    whole = scaffold.lookahead(params, sparse, opt, cfg)[0].detach()
    restricted = scaffold.lookahead(params, [sparse[0][some_rows], *sparse[1:]], opt, cfg, rows={0: some_rows})
    assert restricted[0].shape == (3, 4)
    assert torch.allclose(restricted[0].detach(), whole[some_rows], atol=1e-7)
    nn.functional.cross_entropy(net(x), y).backward()
    scaffold.student_step(params, opt, cfg)
    for real, ahead in zip(params, predicted, strict=True):
        assert torch.allclose(real.detach(), ahead, atol=1e-6)


def test_meta_gradient_matches_finite_differences():
    torch.set_default_dtype(torch.float64)
    try:
        cfg = scaffold.ScaffoldConfig(student_lr=0.5, weight_decay=0.01, clip_grad_norm=100.0)
        teacher, student = tiny_bert(0).double(), tiny_bert(1).double()
        teacher.eval()
        layers, heads = 2, 4
        model = scaffold.ExplainedStudent(student, AttentionExplainer(layers, heads, "softmax")).double()
        explainer = AttentionExplainer(layers, heads, "softmax").double()
        with torch.no_grad():
            explainer.phi.copy_(torch.linspace(-1, 1, layers * heads))
        batch, meta_batch = text_batch(4), text_batch(4, 20)
        with torch.no_grad():
            t_logits, attentions = teacher.classify(batch, output_attentions=True, log_attention=True)
            meta_targets = teacher.classify(meta_batch)[0]
        evidence = head_scores(attentions, batch["attention_mask"])
        opt = scaffold.make_student_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
        learner = scaffold.Learner(model, [p for p in model.parameters() if p.requires_grad], opt, cfg, 5.0)
        words = scaffold.words_read(batch, meta_batch)
        lesson, meta = scaffold.Lesson(batch, t_logits, evidence), scaffold.MetaBatch(meta_batch, meta_targets, words)
        grad = scaffold.meta_gradient(learner, explainer, lesson, meta).phi_grad
        # the word-embedding table entering as the rows the batches read is exact: the whole table gives the same
        whole_table = scaffold.meta_gradient(learner, explainer, lesson, meta._replace(words=None)).phi_grad
        assert torch.allclose(grad, whole_table, atol=1e-10)

        direction = torch.randn(layers * heads)
        eps = 1e-5

        def meta_loss_at(phi):
            probe = copy.deepcopy(explainer)
            with torch.no_grad():
                probe.phi.copy_(phi)
            return scaffold.meta_gradient(learner, probe, lesson, meta).meta_loss

        numeric = (meta_loss_at(explainer.phi + eps * direction) - meta_loss_at(explainer.phi - eps * direction)) / (
            2 * eps
        )
        assert grad.abs().sum() > 0
        assert (grad @ direction).item() == pytest.approx(numeric.item(), rel=1e-3, abs=1e-8)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_student_step_unroll_takes_exactly_the_plain_student_step(optimizer):
    """meta_unroll=student_step: the meta step's gradients (word-embedding rows gathered) make the real step,
    which must leave the student exactly where the plain step does."""
    cfg = scaffold.ScaffoldConfig(student_optimizer=optimizer, student_lr=0.05, clip_grad_norm=0.5)
    teacher = tiny_bert(0).eval()
    batch, meta_batch = text_batch(4), text_batch(4, 20)
    with torch.no_grad():
        t_logits, attentions = teacher.classify(batch, output_attentions=True, log_attention=True)
        meta_targets = teacher.classify(meta_batch)[0]
    evidence = head_scores(attentions, batch["attention_mask"])
    after = []
    for combined in (False, True):
        model = scaffold.ExplainedStudent(tiny_bert(1), AttentionExplainer(2, 4))
        explainer = AttentionExplainer(2, 4)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = scaffold.make_student_optimizer(params, cfg)
        for _ in range(2):  # the second step starts from AdamW moments
            learner = scaffold.Learner(model, params, opt, cfg.model_copy(update={"meta_unroll": "student_step"}), 5.0)
            words = scaffold.words_read(batch, meta_batch)
            meta_args = (scaffold.MetaBatch(meta_batch, meta_targets, words),) if combined else ()
            _, meta = scaffold.student_iteration(
                learner, scaffold.Lesson(batch, t_logits, evidence), explainer, explainer, *meta_args
            )
            if combined:  # the table's gradient came as the rows the two batches read, and phi has a gradient
                assert meta.rows and meta.grads[next(iter(meta.rows))].shape[0] < params[0].shape[0]
                assert meta.phi_grad.abs().sum() > 0
        after.append([p.detach().clone() for p in params])
    for plain, combined in zip(*after, strict=True):
        assert torch.allclose(plain, combined, atol=1e-6)
    assert not torch.equal(after[0][0], tiny_bert(1).encoder.get_input_embeddings().weight)  # it did move


def test_integrated_gradients_follow_the_whole_straight_line_path():
    """Completeness: attributions sum to f(input) - f(baseline) when the path really reaches the input."""
    model = tiny_bert(0).eval()
    batch = text_batch(2)
    scores = gradient.integrated_gradients(model, batch, steps=200)
    with torch.no_grad():
        logits = model.classify(batch)[0]
        target = logits.argmax(-1)
        zero = model.classify(batch, inputs_embeds=torch.zeros_like(model.embed(batch["input_ids"])))[0]
    gap = logits.gather(1, target[:, None]) - zero.gather(1, target[:, None])
    assert torch.allclose(scores.sum(-1), gap.squeeze(1), rtol=0.05, atol=1e-3)
    assert gradient.gradient_norm(model, batch).shape == batch["input_ids"].shape
    assert (gradient.gradient_norm(model, batch) >= 0).all()


def test_teacher_registry_trains_once_and_reloads_with_weights_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TEACHSWEEP_CACHE", str(tmp_path))
    config = tiny_bert_teacher(steps_per_epoch=3, max_train_examples=64)
    first, cfg = teacher_job.resolve(config, torch.device("cpu"))
    checkpoint = teacher_job.registry_dir(teacher_job.TeacherConfig(**config)) / "model.pt"
    stamp = checkpoint.stat().st_mtime_ns
    second, _ = teacher_job.resolve(config, torch.device("cpu"))
    assert checkpoint.stat().st_mtime_ns == stamp  # reused, not retrained
    assert all(
        torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )
    assert not any(p.requires_grad for p in second.parameters()) and not second.training
    torch.load(checkpoint, weights_only=True)


@pytest.mark.parametrize("explainer", ["none", "attention_last", "smat", "smat_student_step", "grad_x_input"])
def test_scaffold_job_trains_a_student_and_reports_simulability(tmp_path, monkeypatch, explainer):
    monkeypatch.setenv("TEACHSWEEP_CACHE", str(tmp_path))
    reporter = Reporter()
    unroll = "student_step" if explainer == "smat_student_step" else "lookahead"
    job = small_scaffold_job(
        tiny_bert_teacher(), explainer.removesuffix("_student_step"), 2, meta_unroll=unroll, max_length=24
    )
    metrics = scaffold.train(job, reporter)
    assert 0.0 <= metrics["simulability/test"] <= 1.0 and "student/test_acc" in metrics
    assert [h["epoch"] for h in reporter.history][:2] == [1, 2]
    if explainer.startswith("smat"):
        coefficients = reporter.artifacts["head_coefficients.json"]["layers_by_heads"]
        assert len(coefficients) == 2 and len(coefficients[0]) == 4
        assert sum(map(sum, coefficients)) == pytest.approx(1.0, abs=1e-5)
        assert metrics["loss/meta"] > 0


def test_plausibility_metrics_on_hand_made_rationales():
    from teachsweep.plausibility import mean_plausibility, plausibility, word_scores

    rationale = np.array([0, 1, 1, 0, 0])
    perfect = plausibility(np.array([0.1, 0.9, 0.8, 0.2, 0.0]), rationale)
    assert perfect == {"auc": 1.0, "ap": 1.0, "recall_at_k": 1.0}
    assert plausibility(np.array([0.9, 0.1, 0.0, 0.8, 0.7]), rationale)["auc"] == 0.0
    assert plausibility(np.ones(3), np.ones(3)) is None  # nothing to rank: skipped
    # a word scores its best piece; special tokens (None) are dropped
    assert word_scores(np.array([0.5, 0.2, 0.3, 0.9]), [None, 0, 0, 1], 2).tolist() == [0.3, 0.9]
    assert mean_plausibility([(np.array([1.0, 0.0]), np.array([1, 0])), (np.ones(2), np.ones(2))])["n"] == 1.0


def write_rationales(tmp_path):
    """Rationales built here: words of a small sentiment lexicon in validation sentences, as jsonl."""
    import json

    lexicon = {"good", "bad", "great", "best", "worst", "funny", "boring", "dull", "fun", "love"}
    task = tasks.load_task("rotten_tomatoes")
    lines = []
    for text in task.splits["validation"].texts[:400]:
        words = text.split()
        mask = [int(w.lower().strip(".,!?") in lexicon) for w in words]
        if 0 < sum(mask) < len(words):
            lines.append(json.dumps({"words": words, "rationale": mask}))
    assert len(lines) >= 10
    (tmp_path / "rationales.jsonl").write_text("\n".join(lines))
    return f"jsonl:{tmp_path / 'rationales.jsonl'}"


def test_scaffold_reports_plausibility_against_a_rationale_set_built_here(tmp_path, monkeypatch):
    monkeypatch.setenv("TEACHSWEEP_CACHE", str(tmp_path))
    rationales = write_rationales(tmp_path)
    job = small_scaffold_job(tiny_bert_teacher(), "smat", 1, max_length=48, rationales=rationales)
    metrics = scaffold.train(job)
    for who in ("teacher", "student"):
        assert 0.0 <= metrics[f"plausibility/{who}_auc"] <= 1.0 and metrics[f"plausibility/{who}_n"] >= 10
        assert 0.0 <= metrics[f"plausibility/{who}_recall_at_k"] <= 1.0


SMAT_SPEC = """
name: smat-it
job: scaffold
config:
  teacher: {task: rotten_tomatoes, model: tiny-bert, lr: 1.0e-3, epochs: 1, steps_per_epoch: 5, max_eval_examples: 32,
            max_length: 24, max_train_examples: 128}
  explainer: smat
  num_train_examples: 32
  batch_size: 8
  max_epochs: 2
  max_eval_examples: 32
  max_length: 24
space:
  meta_lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
num_samples: 2
max_concurrent_trials: 2
results_dir: RESULTS
"""


@pytest.mark.integration
def test_smat_sweep_logs_simulability_and_head_coefficient_artifacts(ray_session, tmp_path):
    from mlflow.tracking import MlflowClient

    from teachsweep.spec import parse_spec
    from teachsweep.sweep import run_sweep

    text = SMAT_SPEC.replace("RESULTS", str(tmp_path / "results"))
    outcome = run_sweep(parse_spec(text), text)
    assert [row["status"] for row in outcome.trials] == ["OK", "OK"]
    client = MlflowClient(outcome.tracking_uri)
    for row in outcome.trials:
        run = client.get_run(row["mlflow_run_id"])
        assert 0.0 <= run.data.metrics["simulability/test"] <= 1.0
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"head_coefficients.json", "head_coefficients.png"} <= artifacts


def test_smat_on_a_vit_explains_patch_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("TEACHSWEEP_CACHE", str(tmp_path))
    teacher = vit_digits_teacher("vit:2")
    reporter = Reporter()
    metrics = scaffold.train(small_scaffold_job(teacher, "smat", 1), reporter)
    assert 0.0 <= metrics["simulability/test"] <= 1.0 and metrics["loss/meta"] > 0
    assert len(reporter.artifacts["head_coefficients.json"]["layers_by_heads"]) == 2
    gradient_student = scaffold.train(small_scaffold_job(teacher, "integrated_gradients", 1))
    assert 0.0 <= gradient_student["simulability/test"] <= 1.0


def test_gradient_explainers_score_a_vits_cls_and_patch_tokens_with_complete_integrated_gradients():
    task = tasks.load_task("digits")
    model = models.build_model("vit:2", task, seed=0).eval()
    batch = next(data.train_stream(data.make_batches(task, "validation"), 3, seed=1))
    with torch.no_grad():
        logits = model.classify(batch)[0]
        assert torch.allclose(model.classify(batch, inputs_embeds=model.embed(batch))[0], logits, atol=1e-5)
        zero = model.classify(batch, inputs_embeds=torch.zeros_like(model.embed(batch)))[0]
    tokens = model.classify(batch, output_attentions=True)[1][0].shape[-1]  # [CLS] + patches
    for explainer in (gradient.gradient_norm, gradient.gradient_x_input):
        assert explainer(model, batch).shape == (3, tokens)
    scores = gradient.integrated_gradients(model, batch, steps=200)
    target = logits.argmax(-1)[:, None]
    gap = (logits.gather(1, target) - zero.gather(1, target)).squeeze(1)
    assert scores.shape == (3, tokens) and torch.allclose(scores.sum(-1), gap, rtol=0.05, atol=1e-3)


def regression_csv(path) -> str:
    """A real-valued target on real sentences: the review's polarity plus a length term (so it is not binary)."""
    import pandas as pd

    task = tasks.load_task("rotten_tomatoes")
    split = task.splits["train"]
    texts = split.texts[:600]
    labels = split.labels.tolist()[:600]
    target = [float(label) + 0.02 * len(text.split()) for text, label in zip(texts, labels, strict=True)]
    pd.DataFrame({"sentence": texts, "score": target}).to_csv(path, index=False)
    return f"csv:{path}"


def test_a_float_target_column_makes_a_regression_task_with_target_stratified_splits(tmp_path):
    from teachsweep.training import pearson

    task = tasks.load_task(regression_csv(tmp_path / "scores.csv"), "sentence", "score")
    assert task.regression and task.num_classes == 1 and task.splits["train"].labels.dtype == torch.float32
    sizes = {name: len(split) for name, split in task.splits.items()}
    assert sum(sizes.values()) <= 600 and sizes["validation"] >= 55 and sizes["test"] >= 55
    means = [split.labels.mean().item() for split in task.splits.values()]
    assert max(means) - min(means) < 0.1  # quintile strata keep the target's distribution in every split
    x, y = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    assert pearson(x, y) == pytest.approx(float(np.corrcoef(x.numpy(), y.numpy())[0, 1]), abs=1e-12)
    assert pearson(x, 3 * x + 1) == pytest.approx(1.0) and pearson(x, torch.ones(50)) == 0.0


@pytest.mark.parametrize("explainer", ["attention", "smat"])
def test_a_regression_teacher_is_simulated_with_mse_and_scored_by_pearson(tmp_path, monkeypatch, explainer):
    monkeypatch.setenv("TEACHSWEEP_CACHE", str(tmp_path))
    task = regression_csv(tmp_path / "scores.csv")
    teacher = dict(
        task=task,
        text_column="sentence",
        label_column="score",
        model="tiny-bert",
        lr=1e-3,
        epochs=2,
        steps_per_epoch=10,
        max_eval_examples=64,
        max_length=24,
    )
    teacher_metrics = teacher_job.train(teacher)
    assert {"teacher/val_pearson", "teacher/test_pearson"} <= set(teacher_metrics)
    assert "teacher/test_acc" not in teacher_metrics
    job = small_scaffold_job(teacher, explainer, 2, num_train_examples=64, max_eval_examples=64, max_length=24)
    metrics = scaffold.train(job)
    assert -1.0 <= metrics["simulability/test"] <= 1.0 and "student/test_pearson" in metrics
    assert metrics["simulability/test_ci_low"] <= metrics["simulability/test_ci_high"]
    assert metrics["teacher/test_pearson"] == pytest.approx(teacher_metrics["teacher/test_pearson"], abs=1e-6)
    if explainer == "smat":
        assert metrics["loss/meta"] > 0


def test_the_simulation_loss_is_mse_to_a_regression_teachers_output():
    student, teacher = torch.tensor([[0.5], [2.0]]), torch.tensor([[1.0], [1.0]])
    assert scaffold.simulation_loss(student, teacher).item() == pytest.approx((0.25 + 1.0) / 2)


def test_cached_teacher_evidence_equals_computing_it_on_the_shuffled_padded_batch():
    teacher = tiny_bert(0).eval().requires_grad_(False)
    task = tasks.load_task("rotten_tomatoes")
    batches = data.make_batches(task, "validation", models.load_tokenizer("tiny-bert"), 32, 48)

    def evidence_of(batch):
        logits, attentions = teacher.classify(batch, output_attentions=True, log_attention=True)
        return logits, head_scores(attentions, batch["attention_mask"])

    cache = scaffold.TeacherCache(batches, evidence_of, teacher, torch.device("cpu"), batch_size=16)
    batch = next(data.train_stream(batches, 8, seed=5))  # shuffled rows, padded to this batch's longest
    cached_logits, cached = cache.lookup(batch)
    logits, direct = evidence_of(batch)
    mask = batch["attention_mask"].bool()
    assert torch.allclose(cached_logits, logits, atol=1e-5)
    assert torch.allclose(cached.transpose(1, 2)[mask], direct.transpose(1, 2)[mask], atol=1e-4)
    assert (cached.transpose(1, 2)[~mask] == 0).all()


def test_student_explanations_use_attention_before_attention_dropout():
    """transformers' eager attention returns weights after attention dropout (exact zeros, the rest scaled by
    1/(1-p)): the student's explanation must be the softmax itself, while dropout still mixes the values."""
    student = models.build_model("tiny-bert:1", tasks.load_task("rotten_tomatoes"), 0)  # one layer: its attention
    for name, module in student.named_modules():  # depends on the embeddings alone, the same in train and eval
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if name.endswith("attention.self.dropout"):
            module.p = 0.5  # attention dropout on, every other dropout off
    model = scaffold.ExplainedStudent(student, AttentionExplainer(1, 4)).train()
    batch = text_batch(4, 24)
    torch.manual_seed(0)
    logits, train_scores = model(batch)
    _, attentions = student.classify(batch, output_attentions=True)
    real_keys = batch["attention_mask"].bool()[:, None, None, :].expand_as(attentions[0])
    assert all((a[real_keys] > 0).all() for a in attentions), "attention dropout zeroed real tokens"
    model.eval()
    eval_logits, eval_scores = model(batch)
    assert torch.allclose(train_scores, eval_scores, atol=1e-5)
    assert not torch.allclose(logits, eval_logits)  # the dropout that regularises the student is still there


def test_student_plausibility_comes_from_the_best_student_and_its_explainer_in_eval_mode(tmp_path, monkeypatch):
    from teachsweep.plausibility import load_rationales, rationale_plausibility

    monkeypatch.setenv("TEACHSWEEP_CACHE", str(tmp_path))
    rationales = write_rationales(tmp_path)
    reporter = Reporter()
    job = small_scaffold_job(tiny_bert_teacher(), "smat", 3, max_length=16, rationales=rationales)
    metrics = scaffold.train(job, reporter)
    best = reporter.saved["best_student"]
    student = models.build_model("tiny-bert", tasks.load_task("rotten_tomatoes"), 123)
    model = scaffold.ExplainedStudent(student, AttentionExplainer(2, 4))
    model.load_state_dict(best["model"])
    model.eval()
    found = rationale_plausibility(
        load_rationales(rationales, 200),
        models.load_tokenizer("tiny-bert"),
        lambda b: model(b)[1],
        16,
        64,
        torch.device("cpu"),
    )
    for key in ("auc", "ap", "recall_at_k"):
        assert metrics[f"plausibility/student_{key}"] == pytest.approx(found[key], abs=1e-9), key
    assert 0 < metrics["plausibility/student_rationale_cut_fraction"] < 1  # max_length 16 cuts long sentences


def test_a_language_model_teacher_keeps_its_lowest_validation_perplexity(tmp_path, monkeypatch):
    monkeypatch.setenv("TEACHSWEEP_CACHE", str(tmp_path))
    reporter = Reporter()
    metrics = teacher_job.train(
        dict(
            task="bbc_news_lm",
            model="lstm:1",
            optimizer="sgd",
            lr=20.0,
            momentum=0.0,
            weight_decay=0.0,
            epochs=3,
            steps_per_epoch=4,
            batch_size=4,
            bptt=16,
            max_eval_examples=2000,
            patience=3,
        ),
        reporter,
    )
    curve = [h["teacher/val_ppl"] for h in reporter.history if "teacher/test_ppl" not in h]
    assert len(curve) == 3 and len(set(curve)) == 3
    assert metrics["teacher/best_val_ppl"] == min(curve)
    assert metrics["teacher/best_epoch"] == 1 + curve.index(min(curve))


def test_head_scores_are_exact_where_attention_underflows_and_keep_their_gradient():
    """A sharply attending head has probabilities far below 1e-12 (1e-39 in a pretrained MiniLM): the head
    scores come from log_softmax of the attention scores, equal to the pre-softmax scores' up to a constant per
    head, and every parameter behind them gets a finite gradient."""
    model = models.build_model("tiny-bert:1", tasks.load_task("rotten_tomatoes"), 0).eval()
    attention = model.encoder.encoder.layer[0].attention.self
    with torch.no_grad():
        attention.query.weight.mul_(100.0)
        attention.key.weight.mul_(100.0)
    batch = text_batch(4, 24)
    mask = batch["attention_mask"]
    _, probs = model.classify(batch, output_attentions=True)
    _, log_probs = model.classify(batch, output_attentions=True, log_attention=True)
    real = mask.bool()[:, None, None, :].expand_as(probs[0])
    assert (log_probs[0][real] < math.log(1e-12)).float().mean() > 0.05  # the regime where clamping changed it
    assert torch.allclose(log_probs[0].exp(), probs[0], atol=1e-6)
    # the same scores from the pre-softmax attention logits Z = QK^T / sqrt(d) (plus the padding bias)
    hidden = model.encoder.embeddings(input_ids=batch["input_ids"])
    heads, size = attention.config.num_attention_heads, attention.attention_head_size

    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, size).transpose(1, 2)

    z = split(attention.query(hidden)) @ split(attention.key(hidden)).transpose(-1, -2) / math.sqrt(size)
    rows = mask.float() / mask.sum(-1, keepdim=True)
    from_z = torch.einsum("bkij,bi->bkj", z, rows)
    scores = head_scores(log_probs, mask)
    difference = (scores - from_z).masked_fill(mask[:, None, :] == 0, 0.0)
    constant = difference.sum(-1, keepdim=True) / mask.sum(-1)[:, None, None]
    assert torch.allclose(difference, constant * mask[:, None, :], atol=1e-3)
    explainer = AttentionExplainer(1, heads)
    explained = token_distribution(explainer(scores, mask), mask)
    assert torch.allclose(explained, token_distribution(explainer(from_z, mask), mask), atol=1e-5)
    model.zero_grad()
    _, log_probs = model.classify(batch, output_attentions=True, log_attention=True)
    (token_distribution(explainer(head_scores(log_probs, mask), mask), mask)[:, 1] ** 2).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in (*attention.query.parameters(), *attention.key.parameters()))
    assert attention.query.weight.grad.abs().sum() > 0


def test_a_flat_explanation_gives_no_word_an_edge_for_its_word_pieces():
    """Summed over pieces, a flat explanation ranked every multi-piece word above every single-piece word (all
    of the top-k on rotten_tomatoes sentences against a base rate of about a fifth)."""
    from teachsweep.plausibility import word_scores

    task = tasks.load_task("rotten_tomatoes")
    tokenizer = models.load_tokenizer("minilm")
    sentences = [text.split() for text in task.splits["validation"].texts[:100]]
    encoded = tokenizer(sentences, is_split_into_words=True, padding=True, return_tensors="pt")
    flat = token_distribution(torch.zeros(encoded["input_ids"].shape), encoded["attention_mask"]).numpy()
    multi_piece_words = 0
    for row, words in enumerate(sentences):
        word_ids = encoded.word_ids(row)
        pieces = np.bincount([w for w in word_ids if w is not None], minlength=len(words))
        multi_piece_words += int((pieces > 1).sum())
        scores = word_scores(flat[row], word_ids, len(words))
        assert np.ptp(scores) < 1e-9, words  # every word of a flat explanation scores the same
    assert multi_piece_words > 20  # the sentences do split words


def test_validation_simulability_reads_the_frozen_teachers_cached_logits_and_they_equal_a_fresh_forward():
    """The teacher's validation logits are computed once (the meta cache) and read back every epoch: they are
    exactly what calling the teacher again gives, batch for batch."""
    cfg = scaffold.ScaffoldConfig.model_validate(small_scaffold_job(tiny_bert_teacher(), "attention", 1))
    run = scaffold.setup(cfg)
    fresh = scaffold.outputs(run.student, run.teacher, data.eval_batches(run.splits["validation"], 8), run.device)
    cached = scaffold.outputs(
        run.student, run.teacher, data.eval_batches(run.splits["validation"], 8), run.device, run.meta_cache
    )
    assert len(fresh[1]) == 32
    for ours, theirs in zip(cached, fresh, strict=True):
        assert torch.equal(ours, theirs)
