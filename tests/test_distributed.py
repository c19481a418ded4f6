"""Two gloo DDP workers under a TorchTrainer started from a Tune trial take the same steps as one process on
the same global batches."""

from pathlib import Path
from typing import Any

import pytest
import yaml
from small_jobs import small_scaffold_job, vit_digits_teacher

from teachsweep.jobs import lot
from teachsweep.spec import parse_spec
from teachsweep.sweep import SweepOutcome, run_sweep

pytestmark = pytest.mark.integration

JOB = {
    "task": "digits",
    "teacher": "vit:1",
    "alpha": 0.5,
    "student_steps": 2,
    "epochs": 2,
    "steps_per_epoch": 4,
    "batch_size": 16,
    "optimizer": "sgd",
    "lr": 0.05,
    "max_eval_examples": 64,
    "eval_batch_size": 32,
}


def two_worker_trial(name: str, job: str, config: dict[str, Any], results: Path) -> SweepOutcome:
    """A sweep of one trial with seed 3 (the seed the single-process runs use), trained by 2 DDP workers."""
    spec = {
        "name": name,
        "job": job,
        "config": config,
        "variants": {"ddp": {}},
        "resources": {"workers": 2, "cpus": 1},
        "seeds": [3],
        "results_dir": str(results),
    }
    text = yaml.safe_dump(spec, sort_keys=False)
    return run_sweep(parse_spec(text), text)


def test_two_ddp_workers_match_one_process_with_the_same_global_batch(ray_session, tmp_path):
    single = lot.train(JOB | {"seed": 3})
    outcome = two_worker_trial("ddp", "lot", JOB, tmp_path / "results")
    (row,) = outcome.trials
    assert row["status"] == "OK", row["error"]
    for key in ("loss/teacher", "loss/student"):  # continuous: equal up to float summation order
        assert row["metrics"][key] == pytest.approx(single[key], rel=1e-3), key
    for key in ("teacher/val_acc", "student/val_acc", "teacher/test_acc", "agreement/val"):
        # an argmax may flip where two logits are within float error of each other: 2 of 64 examples at most
        assert row["metrics"][key] == pytest.approx(single[key], abs=2 / 64 + 1e-9), key
    assert row["metrics"]["steps/teacher"] == single["steps/teacher"] == 8


SMAT_JOB = small_scaffold_job(
    vit_digits_teacher("vit:1"), "smat", 2, patience=2, max_eval_examples=64, eval_batch_size=32, meta_lr=0.05
)


def test_two_ddp_workers_meta_learn_the_same_explainer_as_one_process(ray_session, tmp_path):
    """SMaT's look-ahead and meta-gradient bypass DDP's hooks: the explicit all-reduces must give the explainer
    (and the student) the same trajectory as one process on the same global batches."""
    import json

    from mlflow.tracking import MlflowClient

    from teachsweep.jobs import scaffold
    from teachsweep.reporter import Reporter

    reporter = Reporter()
    single = scaffold.train(SMAT_JOB | {"seed": 3}, reporter)  # also trains the shared teacher, once
    outcome = two_worker_trial("ddp-smat", "scaffold", SMAT_JOB, tmp_path / "results")
    (row,) = outcome.trials
    assert row["status"] == "OK", row["error"]
    for key in ("loss/train", "loss/meta"):
        assert row["metrics"][key] == pytest.approx(single[key], rel=1e-3), key
    for key in ("simulability/val", "simulability/test", "student/test_acc"):
        assert row["metrics"][key] == pytest.approx(single[key], abs=2 / 64 + 1e-9), key
    path = MlflowClient(outcome.tracking_uri).download_artifacts(
        row["mlflow_run_id"], "head_coefficients.json", str(tmp_path)
    )
    distributed = [c for row in json.loads(open(path).read())["layers_by_heads"] for c in row]
    expected = [c for row in reporter.artifacts["head_coefficients.json"]["layers_by_heads"] for c in row]
    assert distributed == pytest.approx(expected, abs=1e-5)
    assert expected != pytest.approx([1 / len(expected)] * len(expected), abs=1e-3)  # phi did move


def smat_iteration(unroll: str):
    """One SMaT iteration (student step and meta-gradient) of tiny float64 BERTs without dropout, on this
    worker's shard of fixed global batches (all of them in one process): (phi gradient, student after)."""
    import torch
    from test_smat import text_batch, tiny_bert

    from teachsweep import distributed
    from teachsweep.explain.attention import AttentionExplainer, head_scores
    from teachsweep.jobs import scaffold

    cfg = scaffold.ScaffoldConfig(meta_unroll=unroll, student_lr=0.05, clip_grad_norm=0.5)
    teacher = tiny_bert(0).double().eval()
    batch, meta_batch = text_batch(8), text_batch(8, 20)
    with torch.no_grad():
        t_logits, attentions = teacher.classify(batch, output_attentions=True, log_attention=True)
        meta_targets = teacher.classify(meta_batch)[0]
    evidence = head_scores(attentions, batch["attention_mask"])
    model = scaffold.ExplainedStudent(tiny_bert(1), AttentionExplainer(2, 4)).double()
    explainer = AttentionExplainer(2, 4).double()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = scaffold.make_student_optimizer(params, cfg)
    inner = distributed.shard(batch | {"t_logits": t_logits, "evidence": evidence})
    meta = distributed.shard(meta_batch | {"targets": meta_targets})
    shard_logits, shard_evidence, shard_targets = inner.pop("t_logits"), inner.pop("evidence"), meta.pop("targets")
    learner = scaffold.Learner(model, params, optimizer, cfg, 5.0)
    words = scaffold.words_read(batch, meta_batch)  # of the global batches: the same rows on every worker
    _, step = scaffold.student_iteration(
        learner,
        scaffold.Lesson(inner, shard_logits, shard_evidence),
        explainer,
        explainer,
        scaffold.MetaBatch(meta, shard_targets, words),
    )
    return step.phi_grad, [p.detach() for p in params]


def _smat_worker(rank: int, world: int, init_file: str, unroll: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(smat_iteration(unroll), f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("unroll", ["lookahead", "student_step"])
def test_two_gloo_workers_take_the_smat_step_of_one_process_on_text(tmp_path, unroll):
    """Text students: each worker's shard reads other word-embedding rows, so the meta step's gathered rows must
    be the union over workers for the all-reduced gradients to line up; both unrolls, against one process."""
    import torch

    torch.multiprocessing.spawn(_smat_worker, args=(2, str(tmp_path / "init"), unroll, str(tmp_path)), nprocs=2)
    phi_grad, student = smat_iteration(unroll)
    assert phi_grad.abs().sum() > 0
    for rank in range(2):
        worker_phi_grad, worker_student = torch.load(tmp_path / f"{rank}.pt")
        assert torch.allclose(worker_phi_grad, phi_grad, rtol=1e-6, atol=1e-12)
        for mine, theirs in zip(worker_student, student, strict=True):
            assert torch.allclose(mine, theirs, rtol=1e-8, atol=1e-10)
