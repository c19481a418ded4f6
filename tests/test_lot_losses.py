"""LoT losses and update rules, on hand-made logits and tiny models."""

import math

import pytest
import torch
import torch.nn.functional as F

from teachsweep import data, tasks
from teachsweep.jobs import lot


def cfg(**overrides):
    base = dict(task="digits", teacher="cnn:8", alpha=0.5, temperature=2.0, batch_size=16, epochs=1, steps_per_epoch=3)
    return lot.LoTConfig(**(base | overrides))


def test_kl_direction_and_temperature_squared_on_hand_logits():
    target = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    model = torch.tensor([[0.0, 1.0, 0.0], [1.0, -2.0, 0.0]])
    T = 2.0
    p = F.softmax(target / T, -1)
    q = F.softmax(model / T, -1)
    by_hand = (p * (p.log() - q.log())).sum(-1).mean() * T * T  # KL(target || model), mean over rows, times T^2
    assert lot.kl_divergence(target, model, T).item() == pytest.approx(by_hand.item(), rel=1e-5)
    reverse = (q * (q.log() - p.log())).sum(-1).mean() * T * T
    assert lot.kl_divergence(model, target, T).item() == pytest.approx(reverse.item(), rel=1e-5)
    assert not math.isclose(by_hand.item(), reverse.item(), rel_tol=1e-3)  # the direction matters here


def test_kl_is_a_mean_over_tokens_for_language_models():
    torch.manual_seed(0)
    target, model = torch.randn(4, 7, 11), torch.randn(4, 7, 11)
    per_row = torch.stack(
        [lot.kl_divergence(target.reshape(-1, 11)[i : i + 1], model.reshape(-1, 11)[i : i + 1], 1.5) for i in range(28)]
    )
    assert lot.kl_divergence(target, model, 1.5).item() == pytest.approx(per_row.mean().item(), rel=1e-5)


def test_teacher_loss_sends_no_gradient_into_students_and_vice_versa():
    teacher_logits = torch.randn(5, 4, requires_grad=True)
    student_logits = torch.randn(5, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 0])
    c = cfg()
    lot.teacher_loss(teacher_logits, [student_logits], labels, c).backward()
    assert teacher_logits.grad is not None and student_logits.grad is None
    teacher_logits.grad = None
    lot.student_loss(student_logits, teacher_logits, labels, c).backward()
    assert student_logits.grad is not None and teacher_logits.grad is None


def test_detach_switch_off_lets_gradient_cross():
    teacher_logits = torch.randn(5, 4, requires_grad=True)
    student_logits = torch.randn(5, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 0])
    lot.teacher_loss(teacher_logits, [student_logits], labels, cfg(detach=False)).backward()
    assert student_logits.grad is not None and student_logits.grad.abs().sum() > 0


def test_k_student_regulariser_matches_a_hand_computation():
    torch.manual_seed(1)
    t = torch.randn(6, 3)
    students = [torch.randn(6, 3) for _ in range(3)]
    labels = torch.randint(0, 3, (6,))
    c = cfg(num_students=3, student_weights=[0.2, 0.3, 0.5], alpha=0.7, temperature=1.5)

    def kl(p_logits, q_logits):  # KL(softmax(p/T) || softmax(q/T)) * T^2, row mean
        p, q = F.softmax(p_logits / 1.5, -1), F.softmax(q_logits / 1.5, -1)
        return (p * (p / q).log()).sum(-1).mean() * 1.5**2

    by_hand = F.cross_entropy(t, labels) + 0.7 * sum(
        w * kl(s, t) for w, s in zip([0.2, 0.3, 0.5], students, strict=False)
    )
    assert lot.teacher_loss(t, students, labels, c).item() == pytest.approx(by_hand.item(), rel=1e-5)
    symmetric = by_hand + 0.7 * sum(w * kl(t, s) for w, s in zip([0.2, 0.3, 0.5], students, strict=False))
    assert lot.teacher_loss(
        t, students, labels, cfg(**c.model_dump() | {"symmetric_kl": True})
    ).item() == pytest.approx(symmetric.item(), rel=1e-5)


def test_student_ce_switch():
    t, s = torch.randn(4, 3), torch.randn(4, 3)
    labels = torch.tensor([0, 1, 2, 0])
    with_ce = lot.student_loss(s, t, labels, cfg(student_ce=True)).item()
    without = lot.student_loss(s, t, labels, cfg(student_ce=False)).item()
    assert with_ce == pytest.approx(without + F.cross_entropy(s, labels).item(), rel=1e-5)


def record_teacher_forwards(monkeypatch):
    """Record, for every teacher forward, whether autograd was on and which images it saw."""
    calls = []
    original = lot.models.build_model

    def build(name, task, seed, bptt=64):
        model = original(name, task, seed, bptt)
        model.role = "teacher" if seed == lot.models.init_seed(0, "teacher") else "student"
        model.register_forward_hook(
            lambda m, args, out: calls.append((m.role, torch.is_grad_enabled(), args[0]["pixel_values"].clone()))
        )
        return model

    monkeypatch.setattr(lot.models, "build_model", build)
    return calls


def test_extra_student_steps_use_an_independent_stream_and_no_teacher_graph(monkeypatch):
    calls = record_teacher_forwards(monkeypatch)
    c = cfg(student_steps=3, max_eval_examples=8, eval_batch_size=8, seed=0)
    metrics = lot.train(c)
    assert metrics["steps/teacher"] == 3 and metrics["steps/student"] == 9
    teacher_train = [(grad, x) for role, grad, x in calls if role == "teacher" and x.shape[0] == 16]
    # Per teacher step: one joint forward with autograd on, then N-1 = 2 forwards under no_grad.
    assert [grad for grad, _ in teacher_train] == [True, False, False] * 3
    task = tasks.load_task("digits")
    batches = data.make_batches(task, "train")
    joint = data.train_stream(batches, 16, 0)
    extra = data.train_stream(batches, 16, 10_000)
    expected_joint = [next(joint)["pixel_values"] for _ in range(3)]
    expected_extra = [next(extra)["pixel_values"] for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip([x for g, x in teacher_train if g], expected_joint, strict=False))
    assert all(torch.equal(a, b) for a, b in zip([x for g, x in teacher_train if not g], expected_extra, strict=False))


def test_teacher_only_arm_builds_no_student(monkeypatch):
    calls = record_teacher_forwards(monkeypatch)
    metrics = lot.train(cfg(arm="teacher_only", student_steps=4, max_eval_examples=8))
    assert {role for role, _, _ in calls} == {"teacher"}
    assert metrics["steps/student"] == 0 and metrics["steps/model"] == metrics["steps/teacher"] == 3
    assert not any(k.startswith("student") for k in metrics)


def test_budget_multiplier_scales_teacher_steps_and_model_steps_are_counted():
    lot_metrics = lot.train(cfg(student_steps=2, num_students=2, max_eval_examples=8))
    assert lot_metrics["steps/model"] == 3 * (1 + 2 * 2)
    matched = lot.train(cfg(arm="teacher_only", budget_multiplier=5.0, max_eval_examples=8))
    assert matched["steps/teacher"] == matched["steps/model"] == lot_metrics["steps/model"]


def test_student_gradients_only_from_student_loss_in_a_real_step():
    """After one joint step with detached targets, a zero-alpha run and a normal run give the teacher the same
    update iff the students don't leak into it: compare the teacher against a teacher-only step."""
    c = cfg(alpha=0.0, steps_per_epoch=1, max_eval_examples=8, optimizer="sgd", lr=0.1)
    with_student = lot.train(c)
    alone = lot.train(c.model_dump() | {"arm": "teacher_only"})
    assert with_student["teacher/val_acc"] == alone["teacher/val_acc"]
    assert with_student["loss/teacher"] == pytest.approx(alone["loss/teacher"], rel=1e-6)


def test_no_two_models_share_an_initialisation_across_seeds_and_roles(monkeypatch):
    """Init seeds derive from (seed, role, index), so within a sweep only the same role at the same seed (paired
    arms) shares weights: a student of seed s never starts where the teacher of seed s+1 does."""
    original, built = lot.models.build_model, []

    def build(name, task, seed, bptt=64):
        model = original(name, task, seed, bptt)
        built.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        return model

    monkeypatch.setattr(lot.models, "build_model", build)
    for seed in (0, 1, 2):
        lot.train(cfg(seed=seed, num_students=2, steps_per_epoch=1, max_eval_examples=8))
    assert len(built) == 9  # a teacher and two students per seed
    for i in range(len(built)):
        for j in range(i):
            assert not torch.equal(built[i], built[j]), f"models {j} and {i} start from the same weights"
    teacher_again = built[0]
    lot.train(cfg(seed=0, arm="teacher_only", steps_per_epoch=1, max_eval_examples=8))
    assert torch.equal(built[-1], teacher_again)  # the teacher-only arm pairs with LoT's teacher of the same seed
    seeds = {lot.models.init_seed(s, role, i) for s in range(200) for role in ("teacher", "student") for i in range(4)}
    assert len(seeds) == 200 * 2 * 4


def test_every_arm_is_evaluated_and_stopped_on_the_same_teacher_step_grid():
    """A longer budget runs more epochs of the same teacher steps: its first epochs are the shorter arm's, step
    for step, and patience counts the same teacher steps in both (not epochs (1 + N) times longer)."""
    from teachsweep.reporter import Reporter

    def history(**overrides):
        reporter = Reporter()
        lot.train(cfg(arm="teacher_only", max_eval_examples=64, **overrides), reporter)
        return reporter.history

    short = history(epochs=2)
    long = history(epochs=2, budget_multiplier=3.0)
    assert [row["steps/teacher"] for row in long] == [3 * epoch for epoch in range(1, 7)]
    for a, b in zip(short, long[:2], strict=True):
        assert a["teacher/val_acc"] == b["teacher/val_acc"] and a["loss/teacher"] == b["loss/teacher"]
    patient = history(epochs=30, patience=1, lr=1e-6)  # no progress: stops at its first non-improving epoch
    patient_long = history(epochs=30, patience=1, lr=1e-6, budget_multiplier=3.0)
    assert len(patient) == len(patient_long) < 30
    assert patient[-1]["steps/teacher"] == patient_long[-1]["steps/teacher"]


def test_the_learning_rate_is_divided_after_each_evaluation_without_a_better_validation_score():
    from teachsweep.reporter import Reporter

    reporter = Reporter()
    lot.train(cfg(epochs=6, lr=1e-3, lr_decay_on_plateau=4.0, max_eval_examples=64), reporter)
    best, lr = -1.0, 1e-3
    for row in reporter.history:
        if row["teacher/val_acc"] > best:
            best = row["teacher/val_acc"]
        else:
            lr /= 4.0
        assert row["lr/teacher"] == pytest.approx(lr)
    assert reporter.history[-1]["lr/teacher"] < 1e-3  # the run did meet a plateau


def test_the_imitation_probe_scores_a_fresh_student_of_the_best_teacher_after_the_last_epoch():
    """The probe runs once, after the last epoch (also one ended by patience), on the best-validation teacher; it
    changes nothing of the training it follows; more imitation steps bring the fresh student closer (lower
    held-out KL, higher agreement)."""
    from teachsweep.reporter import Reporter

    def run(**overrides):
        reporter = Reporter()
        base = dict(epochs=3, steps_per_epoch=20, batch_size=32, optimizer="sgd", lr=0.05, max_eval_examples=128)
        lot.train(cfg(**(base | overrides)), reporter)
        return reporter.history

    plain, short, long = run(), run(imitation_steps=1), run(imitation_steps=80)
    probe_keys = {"imitation/val_kl", "imitation/test_kl", "imitation/val_agreement", "imitation/test_agreement"}
    assert [probe_keys <= set(row) for row in long] == [False, False, True]
    assert set(lot.metrics(cfg(imitation_steps=5))) >= probe_keys and not probe_keys & set(lot.metrics(cfg()))
    for a, b in zip(plain, long, strict=True):  # the probe follows training, it does not perturb it
        assert a["teacher/val_acc"] == b["teacher/val_acc"] and a["loss/teacher"] == b["loss/teacher"]
    assert long[-1]["imitation/test_kl"] < short[-1]["imitation/test_kl"]
    assert long[-1]["imitation/test_agreement"] > short[-1]["imitation/test_agreement"]
    assert all(0.0 <= long[-1][k] <= 1.0 for k in ("imitation/val_agreement", "imitation/test_agreement"))
    stopped = run(epochs=30, patience=1, lr=1e-6, imitation_steps=2)
    assert len(stopped) < 30 and "imitation/test_kl" in stopped[-1] and "imitation/test_kl" not in stopped[-2]
    with pytest.raises(ValueError, match="imitation_steps"):
        lot.check_pack(cfg(imitation_steps=5))
