"""Two gloo DDP workers under a TorchTrainer started from a Tune trial take the same steps as one process on
the same global batches."""

import pytest

from teachsweep.jobs import lot
from teachsweep.spec import parse_spec
from teachsweep.sweep import run_sweep

pytestmark = pytest.mark.integration

JOB = {"task": "digits", "teacher": "vit:1", "alpha": 0.5, "student_steps": 2, "epochs": 2, "steps_per_epoch": 4,
       "batch_size": 16, "optimizer": "sgd", "lr": 0.05, "max_eval_examples": 64, "eval_batch_size": 32}  # fmt: skip


def test_two_ddp_workers_match_one_process_with_the_same_global_batch(ray_session, tmp_path):
    single = lot.train(JOB | {"seed": 3})
    text = f"""
name: ddp
job: lot
config: {JOB!r}
variants: {{ddp: {{}}}}
resources: {{workers: 2, cpus: 1}}
seeds: [3]
results_dir: {tmp_path / "results"}
""".replace("'", '"')
    outcome = run_sweep(parse_spec(text), text)
    (row,) = outcome.trials
    assert row["status"] == "OK", row["error"]
    for key in ("loss/teacher", "loss/student"):  # continuous: equal up to float summation order
        assert row["metrics"][key] == pytest.approx(single[key], rel=1e-3), key
    for key in ("teacher/val_acc", "student/val_acc", "teacher/test_acc", "agreement/val"):
        # an argmax may flip where two logits are within float error of each other: 2 of 64 examples at most
        assert row["metrics"][key] == pytest.approx(single[key], abs=2 / 64 + 1e-9), key
    assert row["metrics"]["steps/teacher"] == single["steps/teacher"] == 8


SMAT_JOB = {"teacher": {"task": "digits", "model": "vit:1", "lr": 1e-3, "epochs": 1, "steps_per_epoch": 5,
                        "max_eval_examples": 32},
            "explainer": "smat", "num_train_examples": 32, "batch_size": 8, "max_epochs": 2, "patience": 2,
            "max_eval_examples": 64, "eval_batch_size": 32, "meta_lr": 0.05}  # fmt: skip


def test_two_ddp_workers_meta_learn_the_same_explainer_as_one_process(ray_session, tmp_path):
    """SMaT's look-ahead and meta-gradient bypass DDP's hooks: the explicit all-reduces must give the explainer
    (and the student) the same trajectory as one process on the same global batches."""
    import json

    from mlflow.tracking import MlflowClient

    from teachsweep.jobs import scaffold
    from teachsweep.reporter import Reporter

    reporter = Reporter()
    single = scaffold.train(SMAT_JOB | {"seed": 3}, reporter)  # also trains the shared teacher, once
    text = f"""
name: ddp-smat
job: scaffold
config: {SMAT_JOB!r}
variants: {{ddp: {{}}}}
resources: {{workers: 2, cpus: 1}}
seeds: [3]
results_dir: {tmp_path / "results"}
""".replace("'", '"')
    outcome = run_sweep(parse_spec(text), text)
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
