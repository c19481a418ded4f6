"""Packed trials: a member trained in a pack reports what its unpacked twin reports (same config and seed), fails
or stops alone, resumes from the pack's checkpoint, and a packed sweep reads back as an unpacked one does."""

import math
import os

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from teachsweep import early_stopping
from teachsweep.jobs import lot
from teachsweep.packing import StackedModel, StackedOptimizer, member_column
from teachsweep.reporter import PackReporter, Reporter
from teachsweep.results import open_sweep, trial_rows
from teachsweep.spec import SpecError, parse_spec
from teachsweep.sweep import run_sweep

BASE = lot.DIGITS_QUICK | {"epochs": 3, "device": "cpu", "precision": "fp32"}


def twin_histories(configs: list[dict], train=lot.train) -> list[Reporter]:
    reporters = []
    for config in configs:
        reporter = Reporter()
        try:
            train(config, reporter)
        except FloatingPointError as error:
            reporter.error = str(error)
        reporters.append(reporter)
    return reporters


def assert_same_history(twin: list[dict], packed: list[dict], keys=None, rel: float = 1e-4) -> None:
    assert len(twin) == len(packed), (len(twin), len(packed))
    for ours, theirs in zip(twin, packed, strict=True):
        assert set(ours) == set(theirs)
        for key in keys or ours:
            if key.startswith("time/"):
                continue
            assert math.isclose(ours[key], theirs[key], rel_tol=rel, abs_tol=1e-6), (ours["epoch"], key)


def test_the_stacked_optimizer_steps_each_member_as_torch_steps_it():
    torch.manual_seed(0)
    for kind, options in [
        ("sgd", {"momentum": 0.9, "nesterov": True}),
        ("sgd", {"momentum": 0.0, "nesterov": False}),
        ("adam", {}),
        ("adamw", {}),
    ]:
        models = [torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)) for _ in range(3)]
        twins = [torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)) for _ in range(3)]
        for twin, model in zip(twins, models, strict=True):
            twin.load_state_dict(model.state_dict())
        lrs, decays, clips = [0.1, 0.01, 0.3], [0.0, 0.05, 0.01], [None, 0.5, 0.05]
        momentum = options.get("momentum", 0.9)
        stacked = StackedModel(models)
        optimizer = StackedOptimizer(
            stacked.trainable(),
            kind,
            lr=member_column(lrs, dtype=torch.float64),
            weight_decay=member_column(decays, dtype=torch.float64),
            momentum=member_column([momentum] * 3, dtype=torch.float64),
            clip=member_column(clips),
            nesterov=options.get("nesterov", False),
            lr_factor=lambda step: 1.0 / (1 + step),
        )
        torch_optimizers = []
        for twin, lr, decay in zip(twins, lrs, decays, strict=True):
            if kind == "sgd":
                sgd_options = {"momentum": momentum, "nesterov": options["nesterov"]}
                made = torch.optim.SGD(twin.parameters(), lr=lr, weight_decay=decay, **sgd_options)
            else:
                adam = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
                made = adam(twin.parameters(), lr=lr, weight_decay=decay)
            torch_optimizers.append((made, torch.optim.lr_scheduler.LambdaLR(made, lambda step: 1.0 / (1 + step))))
        for _ in range(5):
            x = torch.randn(3, 8, 5)
            stacked_net = stacked.architecture
            out = torch.func.vmap(
                lambda p, xi, net=stacked_net: torch.func.functional_call(net, p, (xi,)), in_dims=(0, 0)
            )(stacked.params, x)
            out.pow(2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            for i, (twin, (made, schedule)) in enumerate(zip(twins, torch_optimizers, strict=True)):
                twin(x[i]).pow(2).sum().backward()
                if clips[i] is not None:
                    torch.nn.utils.clip_grad_norm_(twin.parameters(), clips[i])
                made.step()
                schedule.step()
                made.zero_grad()
        for i, twin in enumerate(twins):
            for name, value in twin.state_dict().items():
                assert torch.allclose(stacked.params[name][i], value, atol=1e-6), (kind, i, name)


def test_a_model_packed_by_layer_computes_what_the_vmapped_pack_computes():
    """Each linear layer one batched matmul over the members: the same outputs and gradients as vmap of the
    module, on per-member and on shared inputs; a model with a layer it cannot stack is refused."""
    from torch import nn

    from teachsweep.jobs.lot_rl import Agent

    torch.manual_seed(0)
    agents = [Agent("mlp", (6,), 3, 16, critic=True) for _ in range(4)]
    vmapped = StackedModel(agents, pick=lambda out: out)
    layered = StackedModel(agents, pick=lambda out: out, by_layer=True)
    per_member, shared = torch.randn(4, 5, 6), torch.randn(5, 6)
    for inputs, options in ((per_member, {}), (shared, {"shared": True})):
        (logits_v, values_v), (logits_l, values_l) = vmapped(inputs, **options), layered(inputs, **options)
        assert logits_l.shape == logits_v.shape == (4, 5, 3) and values_l.shape == values_v.shape == (4, 5)
        torch.testing.assert_close(logits_l, logits_v)
        torch.testing.assert_close(values_l, values_v)
    grads = []
    for model in (vmapped, layered):
        logits, values = model(per_member)
        grads.append(torch.autograd.grad((logits.square().sum() + values.sum()), list(model.trainable().values())))
    for vmapped_grad, layered_grad in zip(*grads, strict=True):
        torch.testing.assert_close(layered_grad, vmapped_grad)
    with pytest.raises(ValueError, match="not Conv2d"):
        StackedModel([nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())], by_layer=True)
    with_log_std = nn.Sequential(nn.Linear(2, 2))
    with_log_std.register_parameter("log_std", nn.Parameter(torch.zeros(2)))
    with pytest.raises(ValueError, match="not log_std"):
        StackedModel([with_log_std], by_layer=True)
    bare = [nn.Linear(3, 2) for _ in range(2)]
    torch.testing.assert_close(
        StackedModel(bare, pick=lambda out: out, by_layer=True)(per_member[:2, :, :3]),
        StackedModel(bare, pick=lambda out: out)(per_member[:2, :, :3]),
    )


def test_packed_lot_members_report_what_their_unpacked_twins_report():
    """Different seeds, learning rates, alphas, temperatures, clips, patience and annealing in one pack of two
    students each; a member whose loss goes NaN fails alone with its twin's message."""
    base = BASE | {"num_students": 2, "schedule": "cosine", "lr_decay_on_plateau": 2.0, "epochs": 4}
    configs = [
        base | {"alpha": 0.3, "seed": 0, "patience": 1, "lr": 1e-7},  # no better epoch: its patience stops it
        base | {"alpha": 1.0, "seed": 1, "lr": 0.1, "temperature": 2.0, "student_weights": [0.7, 0.3]},
        base | {"alpha": 0.5, "seed": 0, "momentum": 0.0, "clip_grad_norm": None, "weight_decay": 0.1},
        base | {"alpha": 0.5, "seed": 2, "lr": 1e9},  # diverges
    ]
    twins = twin_histories(configs)
    pack = PackReporter([Reporter() for _ in configs])
    finals = lot.train_pack(configs, pack)
    for i in range(3):
        assert_same_history(twins[i].history, pack.members[i].history)
        assert {**finals[i], "epoch": pack.members[i].last["epoch"]} == pack.members[i].last
        for name, value in twins[i].teacher["state"].items():
            assert torch.allclose(pack.members[i].teacher["state"][name], value, atol=1e-5)
    assert len(pack.members[0].history) < 4  # stopped by its patience, as its twin did
    assert 3 not in finals and str(pack.failed[3]) == twins[3].error
    assert not pack.members[3].history and not hasattr(pack.members[3], "teacher")


def test_adam_packed_members_match_their_twins_in_loss():
    """Adam amplifies rounding on parameters whose gradient is zero up to rounding (a convolution's bias before
    batch norm), as the unpacked job's own results differ between 1 and 2 threads: the training losses agree."""
    configs = [BASE | {"optimizer": "adamw", "lr": 0.01, "alpha": a, "seed": s} for a, s in ((0.3, 0), (1.0, 1))]
    twins = twin_histories(configs)
    pack = PackReporter([Reporter() for _ in configs])
    lot.train_pack(configs, pack)
    for twin, member in zip(twins, pack.members, strict=True):
        assert_same_history(twin.history, member.history, keys=["loss/teacher", "loss/student"], rel=1e-5)


class StopAt(PackReporter):
    """Stops member `stop[0]` after epoch `stop[1]` (as early stopping would), keeps every checkpoint, and
    restarts the pack from `restart_from`."""

    def __init__(self, members, stop: tuple[int, int] | None = None, restart_from: dict | None = None):
        super().__init__(members)
        self.stop, self.restart_from, self.checkpoints = stop, restart_from, {}

    def early_stops(self, epoch, results):
        return {self.stop[0]} if self.stop and epoch == self.stop[1] and self.stop[0] in results else set()

    def report(self, epoch, results, checkpoint=None):
        super().report(epoch, results, checkpoint)
        self.checkpoints[epoch] = checkpoint

    def restore(self):
        return self.restart_from


def test_a_stopped_member_leaves_the_pack_and_the_others_go_on_as_their_twins():
    configs = [BASE | {"alpha": a, "seed": s} for a, s in ((0.3, 0), (1.0, 1), (0.5, 2))]
    twins = twin_histories(configs)
    pack = StopAt([Reporter() for _ in configs], stop=(1, 1))
    lot.train_pack(configs, pack)
    assert_same_history(twins[1].history[:1], pack.members[1].history)
    assert not hasattr(pack.members[1], "teacher")  # stopped early: no teacher saved, as a stopped trial saves none
    for i in (0, 2):
        assert_same_history(twins[i].history, pack.members[i].history)


def test_a_pack_restarted_from_its_checkpoint_goes_on_as_if_never_stopped():
    configs = [BASE | {"alpha": a, "seed": s} for a, s in ((0.3, 0), (1.0, 1), (0.5, 0))]
    whole = StopAt([Reporter() for _ in configs], stop=(0, 1))
    lot.train_pack(configs, whole)
    restarted = StopAt([Reporter() for _ in configs], restart_from=whole.checkpoints[2])
    lot.train_pack(configs, restarted)
    for i in (1, 2):  # member 0 left the pack before the checkpoint: the others restart without it
        resumed = [
            {k: v for k, v in h.items() if k != "trial/resumed_from_epoch"} for h in restarted.members[i].history
        ]
        assert_same_history(whole.members[i].history[2:], resumed)
    assert not restarted.members[0].history


def test_asha_milestones_and_cutoffs_follow_tunes_rule():
    assert early_stopping.milestones(1, 2, 8) == [1, 2, 4, 8]
    assert early_stopping.milestones(1, 3, 4) == [1, 3]
    assert not early_stopping.stops(0.1, [], "max", 2)  # the first at a rung goes on
    assert early_stopping.stops(0.2, [0.5, 0.6], "max", 2)
    assert not early_stopping.stops(0.7, [0.5, 0.6], "max", 2)
    assert early_stopping.stops(9.0, [1.0, 2.0], "min", 2) and not early_stopping.stops(0.5, [1.0, 2.0], "min", 2)


def test_packing_is_refused_in_one_line_where_it_cannot_work(tmp_path):
    head = "name: x\njob: {job}\nconfig: {config}\nspace: {{alpha: {{type: uniform, low: 0.1, high: 1.0}}}}\n"
    lot_head = head.format(job="lot", config="{task: digits, teacher: cnn}")
    cases = [
        (lot_head + "resources: {pack: 4, workers: 2}\n", "resources.pack: a pack trains in one process"),
        (lot_head + "seeds: [0, 1]\npack: 4\n", "resources.pack: a packed search runs one seed per trial"),
        (lot_head + "pack: 4\nresources: {pack: 2}\n", "pack: 4 here and 2 under resources"),
        (lot_head + "pack: 0\n", "pack"),
    ]
    for text, expected in cases:
        with pytest.raises(SpecError) as refused:
            parse_spec(text, "s.yaml: ")
        assert expected in str(refused.value) and "\n" not in str(refused.value), str(refused.value)
    scaffold = "name: x\njob: scaffold\nconfig: {}\nspace: {meta_lr: {type: loguniform, low: 0.001, high: 0.1}}\n"
    with pytest.raises(SpecError, match="resources.pack: job 'scaffold' does not pack trials"):
        parse_spec(scaffold + "pack: 2\n", "s.yaml: ")


# a grid's two seeds, its teacher-only arm, where it keeps its results and whether it packs
GRID_TAIL = """seeds: [0, 1]
baseline: {{budget: teacher_steps}}
results_dir: {results}
{pack}
"""

GRID = (
    """
name: {name}
job: lot
config: {{task: digits, teacher: "cnn:8", epochs: 2, steps_per_epoch: 3, batch_size: 16, max_eval_examples: 64,
          optimizer: sgd, lr: 0.05, device: cpu, precision: fp32}}
variants:
  a03: {{alpha: 0.3}}
  a10: {{alpha: 1.0, temperature: 2.0}}
"""
    + GRID_TAIL
)


def plain_and_packed(grid: str, results) -> dict:
    """The grid swept one trial a process ("plain") and packed 8 members a trial ("packed"): each outcome."""
    outcomes = {}
    for name, pack in (("plain", ""), ("packed", "resources: {pack: 8}")):
        text = grid.format(name=name, results=results, pack=pack)
        outcomes[name] = run_sweep(parse_spec(text), text)
    return outcomes


def metrics_by_trial(outcomes: dict) -> dict:
    """{(label, seed): {outcome: the trial's metrics}}, once every trial of every outcome is checked OK."""
    by_config = {}
    for name, outcome in outcomes.items():
        assert all(row["status"] == "OK" for row in outcome.trials), outcome.trials
        for row in outcome.trials:
            by_config.setdefault((row["label"], row["params"]["seed"]), {})[name] = row["metrics"]
    return by_config


def assert_same_metrics(by_config: dict) -> None:
    for key, both in by_config.items():
        for metric, value in both["plain"].items():
            if not metric.startswith("time/"):
                assert math.isclose(value, both["packed"][metric], rel_tol=1e-4, abs_tol=1e-6), (key, metric)


@pytest.mark.integration
def test_a_packed_grid_reads_back_as_the_same_grid_unpacked(ray_session, tmp_path):
    """The same grid (2 variants and their teacher-only arm, 2 seeds) packed and unpacked: every trial's
    metrics are equal, each packed member has its own MLflow run tagged with its pack, and the comparisons agree."""
    outcomes = plain_and_packed(GRID, tmp_path / "results")
    by_config = metrics_by_trial(outcomes)
    assert len(by_config) == 6 and all(len(v) == 2 for v in by_config.values())
    assert_same_metrics(by_config)
    packed = open_sweep("packed", tmp_path / "results")
    assert len(trial_rows(packed)) == 3  # the reader's rows: each variant and the arm, their seeds merged
    client = MlflowClient(packed.tracking_uri)
    query = f"tags.`mlflow.parentRunId` = '{packed.parent_run_id}' and tags.`teachsweep.role` = 'trial'"
    runs = client.search_runs([client.get_experiment_by_name("packed").experiment_id], query)
    assert len(runs) == 6 and all(run.info.status == "FINISHED" for run in runs)
    pack_ids = {run.data.tags["teachsweep.pack_id"] for run in runs}
    assert len(pack_ids) == 2  # LoT members and teacher-only members differ in structure: two packs
    differences = {
        name: sorted((c["variant"], c["metric"], c["diff_mean"]) for c in outcome.comparisons)
        for name, outcome in outcomes.items()
    }
    assert [d[:2] for d in differences["plain"]] == [d[:2] for d in differences["packed"]]
    assert [d[2] for d in differences["plain"]] == pytest.approx([d[2] for d in differences["packed"]], rel=1e-4)


SEARCH = """
name: search
job: lot
config: {{task: digits, teacher: "cnn:8", epochs: 2, steps_per_epoch: 3, batch_size: 16, max_eval_examples: 64,
          optimizer: sgd, lr: 0.05, device: cpu}}
space:
  alpha: {{type: loguniform, low: 0.1, high: 1.0}}
  student_steps: {{type: int, low: 1, high: 3}}
num_samples: 6
resources: {{pack: 4}}
results_dir: {results}
"""


@pytest.mark.integration
def test_a_packed_search_tells_each_member_to_the_study_and_shares_the_structure_within_a_pack(ray_session, tmp_path):
    text = SEARCH.format(results=tmp_path / "results")
    outcome = run_sweep(parse_spec(text), text)
    assert len(outcome.trials) == 6 and all(row["status"] == "OK" for row in outcome.trials)
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{tmp_path / 'results/search/optuna.db'}")
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 6
    by_pack = {}
    for trial in trials:
        by_pack.setdefault(trial.user_attrs["tune_trial_id"].split(".")[0], []).append(trial)
    assert sorted(len(members) for members in by_pack.values()) == [2, 4]
    for members in by_pack.values():
        assert len({t.params["student_steps"] for t in members}) == 1  # N is structural: one per pack
    rows = {row["trial_id"]: row for row in outcome.trials}
    for trial in trials:
        row = rows[trial.user_attrs["tune_trial_id"]]
        assert trial.values[0] == pytest.approx(row["metrics"]["teacher/best_val_acc"])
    assert os.path.exists(tmp_path / "results" / "search" / "report.html")


@pytest.mark.slow
def test_a_driver_killed_mid_pack_resumes_with_one_run_per_member_and_every_epoch_once(tmp_path):
    from test_resilience import kill_then_resume, trial_runs

    text = SEARCH.replace("num_samples: 6", "num_samples: 4").replace("pack: 4", "pack: 2")
    text = text.replace("epochs: 2, steps_per_epoch: 3", "epochs: 4, steps_per_epoch: 120")
    text = text.replace("name: search", "name: killed").format(results=tmp_path / "results")

    def mid_pack(sweep, runs):
        return True if any(r.info.status == "RUNNING" and r.data.metrics for r in runs) else None

    kill_then_resume(tmp_path, "killed", text, mid_pack)
    sweep = open_sweep("killed", tmp_path / "results")
    runs = trial_runs(sweep)
    assert len(runs) == 4 and len({r.data.tags["teachsweep.trial_id"] for r in runs}) == 4
    assert all(r.info.status == "FINISHED" for r in runs)
    client = MlflowClient(sweep.tracking_uri)
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "teacher/val_acc")]
        assert sorted(steps) == [1, 2, 3, 4]
    study = optuna.load_study(study_name="killed", storage=sweep.optuna_url)
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.RUNNING not in states
    assert states.count(optuna.trial.TrialState.COMPLETE) == 4


def test_a_member_that_fails_first_leaves_the_others_their_own_losses():
    configs = [BASE | {"alpha": 0.5, "seed": 2, "lr": 1e9}] + [
        BASE | {"alpha": a, "seed": s} for a, s in ((0.3, 0), (1.0, 1))
    ]
    twins = twin_histories(configs)
    pack = PackReporter([Reporter() for _ in configs])
    lot.train_pack(configs, pack)
    assert 0 in pack.failed
    for i in (1, 2):
        assert_same_history(twins[i].history, pack.members[i].history)


def test_a_member_stopped_at_the_checkpointed_epoch_does_not_come_back_after_a_restart():
    configs = [BASE | {"alpha": a, "seed": s} for a, s in ((0.3, 0), (1.0, 1), (0.5, 2))]
    configs[2] |= {"lr": 1e-7, "patience": 1}  # no better epoch: its patience ends it at epoch 2
    whole = StopAt([Reporter() for _ in configs], stop=(0, 2))
    lot.train_pack(configs, whole)
    assert whole.checkpoints[2]["active"] == [1]
    restarted = StopAt([Reporter() for _ in configs], restart_from=whole.checkpoints[2])
    lot.train_pack(configs, restarted)
    assert not restarted.members[0].history and not restarted.members[2].history
    assert [h["epoch"] for h in restarted.members[1].history] == [3]


def test_a_pack_restarted_from_its_last_checkpoint_still_saves_its_teachers():
    configs = [BASE | {"alpha": a, "seed": s} for a, s in ((0.3, 0), (1.0, 1))]
    whole = StopAt([Reporter() for _ in configs])
    lot.train_pack(configs, whole)
    restarted = StopAt([Reporter() for _ in configs], restart_from=whole.checkpoints[BASE["epochs"]])
    finals = lot.train_pack(configs, restarted)
    for i in (0, 1):
        assert not restarted.members[i].history  # nothing left to train
        assert torch.equal(
            restarted.members[i].teacher["state"]["net.head.weight"],
            whole.members[i].teacher["state"]["net.head.weight"],
        )
        assert finals[i]["teacher/best_val_acc"] == whole.members[i].last["teacher/best_val_acc"]


def test_asha_per_member_ends_at_max_t_and_cuts_at_milestones_crossed(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    asha = early_stopping.StudyASHA(url, "s", "max", grace_period=1, reduction_factor=1.5, max_t=4)
    assert early_stopping.milestones(1, 1.5, 4) == [1, 1.5, 2.25, 3.375]
    numbers = [study.ask().number for _ in range(3)]
    assert asha.decide(numbers[0], 1, 0.9) == early_stopping.CONTINUE  # the first at a rung goes on
    assert asha.decide(numbers[1], 1, 0.5) == early_stopping.CUT
    assert asha.decide(numbers[0], 2, 0.9) == early_stopping.CONTINUE  # crosses 1.5 at epoch 2
    assert asha.decide(numbers[2], 2, 0.1) == early_stopping.CUT
    assert asha.decide(numbers[0], 4, 0.1) == early_stopping.END  # Tune ends a trial at max_t, whatever its value
    assert study.trials[0].intermediate_values == {1: 0.9, 2: 0.9, 4: 0.1}


RL = {
    "task": "gym:CartPole-v1",
    "num_envs": 4,
    "num_steps": 64,
    "num_minibatches": 4,
    "update_epochs": 2,
    "steps_per_epoch": 512,
    "epochs": 3,
    "eval_episodes": 3,
    "buffer_rollouts": 2,
    "student_steps": 2,
    "step_limit": 50,  # time limits inside the rollouts: their bootstrapped rewards are compared too
    "device": "cpu",
}


def rl_twins(configs: list[dict]) -> list[Reporter]:
    from teachsweep.jobs import lot_rl

    reporters = []
    for config in configs:
        reporter = Reporter()
        try:
            lot_rl.train(config, reporter)
        except (FloatingPointError, ValueError) as error:
            reporter.error = str(error)
        reporters.append(reporter)
    return reporters


@pytest.mark.parametrize("task", ["gym:CartPole-v1", "gym:Acrobot-v1"])
def test_classic_control_as_arrays_steps_as_gymnasiums_vector_env_number_for_number(task):
    """Long enough, and with a policy good enough, for many episodes to end by the game (Acrobot swings up with
    torque along its second joint's velocity): Acrobot is chaotic, so a last-bit difference would show."""
    import numpy as np

    from teachsweep.environments import BATCHED, finished_episodes, make_vector_env

    n = 32
    ours, theirs = BATCHED[task](n), make_vector_env(task, n)
    seeds = [5000 + i for i in range(n)]
    obs = ours.reset(seeds)
    assert np.array_equal(obs, theirs.reset(seed=seeds)[0])
    rng = np.random.default_rng(0)
    ended_by_game = 0
    for t in range(3000):
        if task == "gym:Acrobot-v1":
            action = np.where(obs[:, 5] > 0, 2, 0)
            action = np.where(rng.random(n) < 0.3, rng.integers(0, 3, n), action)
        else:
            action = rng.integers(0, 2, n)
        obs, reward, terminated, truncated, final, returns = ours.step(action)
        their_obs, their_reward, their_terminated, their_truncated, info = theirs.step(action)
        assert np.array_equal(obs, their_obs) and np.array_equal(reward, their_reward), t
        assert np.array_equal(terminated, their_terminated) and np.array_equal(truncated, their_truncated), t
        ended, their_returns = finished_episodes(info)
        assert np.array_equal(returns[ended], their_returns), t
        for i in np.flatnonzero(ended):
            assert np.array_equal(final[i], info["final_obs"][i]), t
        ended_by_game += int(terminated.sum())
    assert ended_by_game > 200, ended_by_game


@pytest.mark.parametrize(("arm", "task"), [("lot", "gym:CartPole-v1"), ("teacher_only", "gym:Acrobot-v1")])
def test_packed_lot_rl_members_report_what_their_unpacked_twins_report(arm, task):
    """Different seeds, learning rates and schedules' floors, entropy and clip coefficients, gammas, GAE lambdas,
    alphas and temperatures, two students, gradient clipping on and off, and a member that goes NaN."""
    from teachsweep.jobs import lot_rl

    base = RL | {"arm": arm, "task": task, "num_students": 2}
    configs = [
        base | {"seed": 0, "alpha": 0.5},
        base | {"seed": 1, "alpha": 1.0, "lr": 1e-3, "ent_coef": 0.02, "gamma": 0.98, "max_grad_norm": None},
        base | {"seed": 1, "lr": float("inf")},  # diverges: fails alone
        base | {"seed": 2, "alpha": 0.2, "clip_coef": 0.2, "temperature": 2.0, "lr_min": 1e-5, "gae_lambda": 0.9},
    ]
    twins = rl_twins(configs)
    pack = PackReporter([Reporter() for _ in configs])
    finals = lot_rl.train_pack(configs, pack)
    for i in (0, 1, 3):
        assert_same_history(twins[i].history, pack.members[i].history)
        assert {**finals[i], "epoch": pack.members[i].last["epoch"]} == pack.members[i].last
    # its twin stops in its first update too (a NaN policy: torch.distributions refuses its logits)
    assert str(pack.failed[2]).startswith("PPO losses are not finite in epoch 1") and hasattr(twins[2], "error")
    assert not pack.members[2].history and not twins[2].history


def test_lot_rl_packs_only_what_it_steps_as_arrays(tmp_path):
    spec = """
name: x
job: lot_rl
config: {task: "gym:MountainCar-v0", num_envs: 4, num_steps: 32, steps_per_epoch: 128}
space: {alpha: {type: uniform, low: 0.1, high: 1.0}}
pack: 4
"""
    from teachsweep.preflight import check_spec

    with pytest.raises(SpecError) as refused:
        check_spec(parse_spec(spec, "s.yaml: "), "s.yaml: ")
    assert str(refused.value).startswith("s.yaml: config.task: gym:MountainCar-v0 does not pack yet"), str(
        refused.value
    )


def test_a_packed_lot_rl_restarted_from_its_checkpoint_goes_on_without_the_member_that_left():
    """A restarted RL pack draws its actions again from where each twin's global generator starts (a restarted
    twin does the same), so what must hold is that the pack resumes whole: the members that were in it, their
    epochs, optimizers and minibatch generators."""
    from teachsweep.jobs import lot_rl

    configs = [RL | {"seed": s, "alpha": a} for s, a in ((0, 0.5), (1, 1.0), (2, 0.2))]
    whole = StopAt([Reporter() for _ in configs], stop=(1, 1))
    lot_rl.train_pack(configs, whole)
    assert whole.checkpoints[1]["active"] == [0, 2]
    restarted = StopAt([Reporter() for _ in configs], restart_from=whole.checkpoints[2])
    lot_rl.train_pack(configs, restarted)
    assert not restarted.members[1].history
    for i in (0, 2):
        assert [h["epoch"] for h in restarted.members[i].history] == [3]
        assert restarted.members[i].last["steps/env"] == whole.members[i].last["steps/env"]
        assert restarted.members[i].last["trial/resumed_from_epoch"] == 2


RL_GRID = (
    """
name: {name}
job: lot_rl
config: {{task: "gym:CartPole-v1", num_envs: 4, num_steps: 32, num_minibatches: 2, update_epochs: 2,
          steps_per_epoch: 256, epochs: 2, eval_episodes: 3, buffer_rollouts: 2, student_steps: 2, device: cpu}}
variants:
  a05: {{alpha: 0.5}}
  a10: {{alpha: 1.0, lr: 0.001}}
"""
    + GRID_TAIL
)


@pytest.mark.integration
def test_a_packed_lot_rl_grid_reads_back_as_the_same_grid_unpacked(ray_session, tmp_path):
    by_config = metrics_by_trial(plain_and_packed(RL_GRID, tmp_path / "results"))
    assert len(by_config) == 8 and all(len(v) == 2 for v in by_config.values())  # 2 variants x (LoT, own arm) x 2 seeds
    assert_same_metrics(by_config)


TEACHER = {
    "task": "digits",
    "model": "cnn:8",
    "epochs": 4,
    "steps_per_epoch": 4,
    "batch_size": 16,
    "max_eval_examples": 64,
    "optimizer": "sgd",
    "lr": 0.05,
    "device": "cpu",
    "precision": "fp32",
}


def test_packed_teacher_members_report_and_save_what_their_unpacked_twins_do(tmp_path, monkeypatch):
    """Different seeds, learning rates, momentum and patience (one member runs out of it and leaves the pack
    early), and a member that goes NaN: each member's epochs, its final test score, the teacher it hands to its
    run and its registry entry are its twin's."""
    from teachsweep.jobs import teacher

    monkeypatch.setenv("TEACHSWEEP_CACHE", str(tmp_path / "cache"))
    configs = [
        TEACHER | {"seed": 0},
        TEACHER | {"seed": 1, "lr": 0.02, "momentum": 0.5, "patience": 1},
        TEACHER | {"seed": 2, "lr": float("inf")},
        TEACHER | {"seed": 3, "weight_decay": 0.05},
    ]
    twins = twin_histories(configs, teacher.train)
    twin_registry = {
        i: torch.load(teacher.registry_dir(teacher.TeacherConfig(**c)) / "model.pt")
        for i, c in enumerate(configs)
        if i != 2
    }
    monkeypatch.setenv("TEACHSWEEP_CACHE", str(tmp_path / "packed_cache"))
    pack = PackReporter([Reporter() for _ in configs])
    finals = teacher.train_pack(configs, pack)
    assert set(finals) == {0, 1, 3} and str(pack.failed[2]).startswith("teacher loss is not finite in epoch 1")
    assert hasattr(twins[2], "error") and not pack.members[2].history
    assert len(pack.members[1].history) < len(pack.members[0].history)  # out of patience: it left early
    for i in (0, 1, 3):
        assert_same_history(twins[i].history, pack.members[i].history, rel=1e-5)
        assert finals[i] == {k: v for k, v in pack.members[i].last.items() if k != "epoch"}
        saved, twin_saved = pack.members[i].teacher["state"], twins[i].teacher["state"]
        assert list(saved) == list(twin_saved)
        for name in saved:
            torch.testing.assert_close(saved[name], twin_saved[name], rtol=1e-5, atol=1e-6)
        registry = torch.load(teacher.registry_dir(teacher.TeacherConfig(**configs[i])) / "model.pt")
        for name in registry:
            torch.testing.assert_close(registry[name], twin_registry[i][name], rtol=1e-5, atol=1e-6)


TEACHER_SEARCH = """
name: teachers
job: teacher
config: {{task: digits, model: "cnn:8", epochs: 2, steps_per_epoch: 3, batch_size: 16, max_eval_examples: 64,
          optimizer: sgd, device: cpu}}
space:
  lr: {{type: loguniform, low: 0.01, high: 0.1}}
num_samples: 3
resources: {{pack: 3}}
results_dir: {results}
"""


@pytest.mark.integration
def test_a_packed_teacher_search_gives_each_member_its_trial_its_run_and_its_saved_teacher(
    ray_session, tmp_path, monkeypatch
):
    monkeypatch.setenv("TEACHSWEEP_CACHE", str(tmp_path / "cache"))
    text = TEACHER_SEARCH.format(results=tmp_path / "results")
    outcome = run_sweep(parse_spec(text), text)
    assert len(outcome.trials) == 3 and all(row["status"] == "OK" for row in outcome.trials), outcome.trials
    sweep = open_sweep("teachers", tmp_path / "results")
    client = MlflowClient(sweep.tracking_uri)
    query = f"tags.`mlflow.parentRunId` = '{sweep.parent_run_id}' and tags.`teachsweep.role` = 'trial'"
    runs = client.search_runs([client.get_experiment_by_name("teachers").experiment_id], query)
    assert len(runs) == 3 and len({run.data.tags["teachsweep.pack_id"] for run in runs}) == 1
    for run in runs:
        assert run.info.status == "FINISHED" and "teacher/test_acc" in run.data.metrics
        assert {"model.pt", "config.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    study = optuna.load_study(study_name="teachers", storage=sweep.optuna_url)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3 and len({t.params["lr"] for t in complete}) == 3
