"""LoT for reinforcement learning: PPO pieces against hand computations, the KL directions, students that learn
from the buffer only, a CartPole teacher that learns, checkpoints, and a small sweep through Tune, Optuna and
MLflow."""

import math

import gymnasium as gym
import optuna
import pytest
import torch
import yaml
from gymnasium.envs.classic_control.cartpole import CartPoleEnv
from mlflow.tracking import MlflowClient
from reporters import CrashAfter, Resume

from teachsweep import environments
from teachsweep.jobs import ArmPlan, lot_rl
from teachsweep.reporter import Reporter
from teachsweep.spec import SpecError, parse_spec
from teachsweep.sweep import paths_for, run_sweep

TINY = {
    "task": "gym:CartPole-v1",
    "num_envs": 2,
    "num_steps": 32,
    "num_minibatches": 2,
    "steps_per_epoch": 128,
    "epochs": 2,
    "eval_episodes": 2,
    "buffer_rollouts": 2,
    "student_steps": 2,
    "device": "cpu",
}


def test_gae_matches_a_hand_computation_across_an_episode_end():
    rewards = torch.tensor([[1.0], [1.0], [1.0]])
    values = torch.tensor([[0.5], [0.4], [0.3]])
    ended = torch.tensor([[0.0], [1.0], [0.0]])  # the episode ends after step 1
    advantages, targets = lot_rl.gae(rewards, values, ended, torch.tensor([0.2]), gamma=0.9, lam=0.8)
    # t=2: 1 + 0.9*0.2 - 0.3 = 0.88;  t=1 (ended): 1 - 0.4 = 0.6;  t=0: (1 + 0.9*0.4 - 0.5) + 0.9*0.8*0.6 = 1.292
    assert advantages.squeeze(1).tolist() == pytest.approx([1.292, 0.6, 0.88])
    assert targets.squeeze(1).tolist() == pytest.approx([1.792, 1.0, 1.18])


def test_clipped_policy_loss_matches_a_hand_computation_and_stops_clipped_gradients():
    old = torch.zeros(3)
    new = torch.log(torch.tensor([1.5, 0.5, 1.05])).requires_grad_()
    advantages = torch.tensor([1.0, 1.0, -2.0])
    loss = lot_rl.clipped_policy_loss(new, old, advantages, clip=0.2)
    # max(-A r, -A clip(r)): sample 1 -> -1.2 (clipped at 1.2), sample 2 -> -0.5, sample 3 -> 2.1
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.1) / 3)
    loss.backward()
    assert new.grad[0].item() == 0.0  # a ratio beyond 1 + eps with a positive advantage gets no gradient
    assert new.grad[1].item() == pytest.approx(-0.5 / 3) and new.grad[2].item() == pytest.approx(2 * 1.05 / 3)


def test_value_loss_takes_the_larger_of_the_plain_and_the_clipped_error():
    values, old, targets = torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([1.5])
    assert lot_rl.value_loss(values, old, targets, clip=None).item() == pytest.approx(0.5 * 0.25)
    assert lot_rl.value_loss(values, old, targets, clip=0.1).item() == pytest.approx(0.5 * 1.4**2)


def test_kl_directions_and_detachment():
    cfg = lot_rl.LoTRLConfig(temperature=2.0, num_students=2, student_weights=[0.25, 0.75])
    teacher = torch.randn(6, 4, requires_grad=True)
    students = [torch.randn(6, 4, requires_grad=True) for _ in range(2)]
    term = lot_rl.teacher_kl_term(teacher, students, cfg)

    def kl(p_logits, q_logits):  # KL(p || q) at temperature 2, times T^2, mean over rows
        p, q = torch.softmax(p_logits / 2, -1), torch.softmax(q_logits / 2, -1)
        return (p * (p.log() - q.log())).sum(-1).mean() * 4

    expected = 0.25 * kl(students[0], teacher) + 0.75 * kl(students[1], teacher)  # KL(S_i || T)
    assert term.item() == pytest.approx(expected.item(), rel=1e-5)
    term.backward()
    assert teacher.grad is not None and all(s.grad is None for s in students)

    teacher.grad = None
    imitation = lot_rl.student_imitation_loss(students[0], teacher, 2.0)  # KL(T || S)
    assert imitation.item() == pytest.approx(kl(teacher, students[0]).item(), rel=1e-5)
    imitation.backward()
    assert teacher.grad is None and students[0].grad is not None


class CountingCartPole(CartPoleEnv):
    """The real CartPole, counting every step any instance takes."""

    steps = 0

    def step(self, action):
        CountingCartPole.steps += 1
        return super().step(action)


@pytest.fixture
def counting_cartpole():
    name = "teachsweep-test/CountingCartPole-v0"
    if name not in gym.envs.registry:
        gym.register(name, entry_point=CountingCartPole, max_episode_steps=500)
    CountingCartPole.steps = 0
    return f"gym:{name}"


def test_students_learn_from_the_buffer_and_never_step_an_environment(counting_cartpole):
    reporter = Reporter()
    final = lot_rl.train(TINY | {"task": counting_cartpole, "arm": "lot"}, reporter)
    assert final["steps/env"] == TINY["epochs"] * TINY["steps_per_epoch"]
    # every environment step was the teacher's rollout or a greedy evaluation episode
    assert CountingCartPole.steps == final["steps/env"] + final["steps/eval_env"]
    assert final["steps/student"] > final["steps/teacher"]  # the buffer passes ran

    cfg = lot_rl.LoTRLConfig(**TINY | {"student_steps": 10, "lr": 1e-2})
    teacher = lot_rl.build_agent(cfg, (4,), 2, "teacher")
    torch.nn.init.normal_(teacher.actor_head.weight)  # a decided teacher, far from the near-uniform student
    student = lot_rl.build_agent(cfg, (4,), 2, "student")
    buffer = [torch.randn(64, 4)]
    before = lot_rl.kl_divergence(teacher.logits(buffer[0]), student.logits(buffer[0]), 1.0).item()
    optimizer = lot_rl.make_optimizer(student, cfg, 10)
    steps = lot_rl.student_passes(
        teacher, [student], [optimizer], buffer, cfg, torch.Generator().manual_seed(0), torch.device("cpu"), "fp32"
    )
    after = lot_rl.kl_divergence(teacher.logits(buffer[0]), student.logits(buffer[0]), 1.0).item()
    assert steps == cfg.student_steps * math.ceil(64 / cfg.minibatch_size) and after < 0.5 * before


def test_the_teacher_only_arm_builds_no_student():
    reporter = Reporter()
    final = lot_rl.train(TINY | {"arm": "teacher_only", "epochs": 1}, reporter)
    assert not any(key.startswith("student") for key in reporter.saved)
    assert not any(key.startswith(("student", "agreement")) for key in final)
    assert final["steps/student"] == 0 and final["steps/model"] == final["steps/teacher"]


def test_a_short_cartpole_run_learns_well_above_a_random_policy():
    """A random CartPole policy lasts about 22 steps; a broken update (wrong sign, no GAE) stays far below 200."""
    reporter = Reporter()
    config = lot_rl.CARTPOLE_QUICK | {"arm": "teacher_only", "device": "cpu", "seed": 0}
    final = lot_rl.train(config, reporter)
    assert final["teacher/best_eval_return"] >= 200, [h["teacher/eval_return"] for h in reporter.history]
    assert reporter.history[-1]["teacher/train_return"] > 2 * reporter.history[0]["teacher/train_return"]


def test_a_restarted_rl_trial_continues_after_its_checkpoint():
    crashed = CrashAfter(1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        lot_rl.train(TINY, crashed)
    resumed = Resume(crashed.saved)
    final = lot_rl.train(TINY, resumed)
    assert [h["epoch"] for h in resumed.history] == [2] and final["trial/resumed_from_epoch"] == 1
    assert (
        final["steps/env"] == 2 * TINY["steps_per_epoch"] and final["steps/teacher_updates"] == 4
    )  # 2 epochs x 2 rollouts
    assert len(crashed.saved["counters"]["eval_returns"]) == 1 and math.isfinite(final["teacher/eval_return_auc"])


def test_the_model_steps_arm_matches_lots_gradient_steps():
    """With a one-rollout buffer LoT's gradient steps per teacher update are constant, so the teacher-only arm the
    `model_steps` budget plans makes exactly as many."""
    lot_config = TINY | {"buffer_rollouts": 1, "epochs": 1}
    cfg = lot_rl.LoTRLConfig(**lot_config)
    (arm,) = lot_rl.fixed_arms(cfg, ArmPlan(budgets=["model_steps"]))
    lot = lot_rl.train(lot_config)
    baseline = lot_rl.train(lot_config | {k: v for k, v in arm.items() if k != "label"})
    assert arm["label"] == "teacher_only-N2" and baseline["steps/teacher"] == lot["steps/model"]
    assert baseline["steps/env"] == arm["budget_multiplier"] * lot["steps/env"]


@pytest.mark.parametrize("task", ["minatar:breakout", "ale:Pong"])
def test_minatar_and_atari_agents_train_a_step(task):
    config = {
        "task": task,
        "num_envs": 2,
        "num_steps": 8,
        "num_minibatches": 2,
        "steps_per_epoch": 16,
        "epochs": 1,
        "eval_episodes": 1,
        "eval_step_limit": 20,
        "student_steps": 1,
        "device": "cpu",
    }
    final = lot_rl.train(config)
    assert final["steps/env"] == 16 and math.isfinite(final["loss/value"]) and "student/eval_return" in final
    kind = environments.env_kind(task)
    shape = {"minatar": (10, 10, 4), "atari": (4, 84, 84)}[kind]
    assert lot_rl.build_agent(lot_rl.LoTRLConfig(**config), shape, 3, "teacher")(torch.zeros(5, *shape))[0].shape == (
        5,
        3,
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"task": "gym:Pendulum-v1"}, "config.task: task 'gym:Pendulum-v1': PPO here needs discrete actions"),
        ({"task": "minatar:pong"}, "config.task: task 'minatar:pong': MinAtar games are"),
        ({"task": "ale:NoSuchGame"}, "config.task: task 'ale:NoSuchGame': ale-py has no game"),
        ({"task": "CartPole-v1"}, "config.task: task 'CartPole-v1': an RL task is gym:<id>"),
        ({"steps_per_epoch": 100}, "config.steps_per_epoch: 100 is not a whole number of rollouts"),
    ],
)
def test_bad_rl_specs_are_refused_with_the_field_named(change, message):
    spec = {
        "name": "bad-rl",
        "job": "lot_rl",
        "config": TINY | change,
        "space": {"alpha": {"type": "uniform", "low": 0.1, "high": 1.0}},
    }
    with pytest.raises(SpecError) as error:
        parse_spec(yaml.safe_dump(spec))
    assert str(error.value).startswith(message), str(error.value)


def test_rl_trials_run_in_one_process():
    spec = {
        "name": "bad-rl",
        "job": "lot_rl",
        "config": TINY,
        "space": {"alpha": {"type": "uniform", "low": 0.1, "high": 1.0}},
        "resources": {"workers": 2},
    }
    with pytest.raises(SpecError, match="resources.workers: job 'lot_rl' runs in one process"):
        parse_spec(yaml.safe_dump(spec))


@pytest.mark.integration
def test_a_tiny_rl_sweep_through_tune_optuna_and_mlflow(ray_session, tmp_path):
    spec_dict = {
        "name": "rl-sweep",
        "job": "lot_rl",
        "config": TINY,
        "space": {
            "alpha": {"type": "loguniform", "low": 0.1, "high": 1.0},
            "student_steps": {"type": "int", "low": 1, "high": 2},
        },
        "num_samples": 2,
        "max_concurrent_trials": 2,
        "baseline": {"budget": "teacher_steps"},
        "results_dir": str(tmp_path / "results"),
    }
    text = yaml.safe_dump(spec_dict)
    spec = parse_spec(text)
    outcome = run_sweep(spec, text)
    assert sorted(row["label"] for row in outcome.trials) == ["lot", "lot", "teacher_only"]
    assert all(row["status"] == "OK" for row in outcome.trials)

    client = MlflowClient(outcome.tracking_uri)
    experiment = client.get_experiment_by_name("rl-sweep")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`teachsweep.role` = 'trial'")
    assert len(runs) == 3 and all(run.info.status == "FINISHED" for run in runs)
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "teacher/eval_return")
        assert [m.step for m in history] == [1, 2]
    study = optuna.load_study(study_name="rl-sweep", storage=paths_for(spec).optuna_url)
    values = sorted(t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    lot_runs = [run for run in runs if run.data.tags["teachsweep.arm"] == "lot"]
    assert values == pytest.approx(sorted(run.data.metrics["teacher/eval_return"] for run in lot_runs))
