"""LoT for reinforcement learning: a PPO teacher that stays easy to imitate (Jin, Che et al. 2024, RL section),
one file, top to bottom.

Only the teacher acts in the environment. One teacher update:
  1. rollout: the teacher samples actions in `num_envs` vectorised envs for `num_steps` steps;
  2. GAE advantages; an episode cut by a time limit is bootstrapped from its last observation's value;
  3. `update_epochs` shuffled passes of `num_minibatches` minibatches; on each, one optimizer step of
        teacher:   PPO clipped policy loss + vf_coef * value loss - ent_coef * entropy
                   + alpha * sum_i lambda_i KL(S_i || T)                     (students detached)
        students:  KL(T || S_i)                                              (teacher detached; `joint_student_step`)
  4. the rollout's observations join a FIFO buffer of the last `buffer_rollouts` rollouts; every student makes N
     (`student_steps`) passes over the buffer, its targets the current teacher's logits under no_grad.
Students are policy networks (no value head) and never step an environment. `arm: teacher_only` builds no
student: plain PPO. An epoch is `steps_per_epoch` environment steps, then greedy evaluation of teacher and students
on separately seeded environments.

Budgets (the sweep's `baseline`): `teacher_steps` = the teacher-only arm at the same environment steps (hence the
same teacher updates and PPO minibatch steps); `model_steps` = the teacher-only arm at the same number of gradient
steps as LoT's teacher and students together, which in RL means `budget_multiplier` times the environment steps.

Not replicated from the public code: alpha forced to 0 on the first update; its two parsed-but-unused flags.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator
from torch import nn

from teachsweep import environments, models, packing
from teachsweep.jobs import ArmPlan, JobSpec, lot
from teachsweep.jobs.lot import LoTTermConfig, kl_divergence, member_kl
from teachsweep.reporter import PackReporter, Reporter
from teachsweep.training import (
    RunConfig,
    autocast,
    pick_device,
    restore_into,
    state_of,
    synchronize,
    uses_bf16,
)
from teachsweep.validation import checks_files

# ---------------------------------------------------------------------------------------------- config


class LoTRLConfig(LoTTermConfig, RunConfig):
    model_config = ConfigDict(extra="forbid")

    task: str = "gym:CartPole-v1"
    arm: Literal["lot", "teacher_only"] = "lot"

    student_steps: int = Field(5, ge=1, description="N: student passes over the buffer per teacher update")
    temperature: float = Field(1.0, gt=0)  # the public code's RL value
    joint_student_step: bool = True  # students also step on each teacher minibatch (the public code does)
    buffer_rollouts: int = Field(10, ge=1)  # FIFO of the observations of the last rollouts
    student_batch_size: int | None = Field(None, ge=1)  # default: the PPO minibatch size
    student_weight_decay: float = Field(1e-4, ge=0)

    num_envs: int = Field(8, ge=1)
    num_steps: int = Field(128, ge=1, description="steps per env in one rollout")
    update_epochs: int = Field(4, ge=1)
    num_minibatches: int = Field(4, ge=1)
    gamma: float = Field(0.99, gt=0, le=1)
    gae_lambda: float = Field(0.95, ge=0, le=1)
    clip_coef: float = Field(0.1, gt=0)
    clip_value_loss: bool = True
    ent_coef: float = Field(0.01, ge=0)
    vf_coef: float = Field(0.5, ge=0)
    max_grad_norm: float | None = Field(0.5, gt=0)
    normalize_advantages: bool = True
    lr: float = Field(2.5e-4, gt=0)
    lr_min: float = Field(0.0, ge=0)  # where the schedule ends
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    adam_eps: float = Field(1e-5, gt=0)
    hidden: int = Field(64, ge=1)  # MLP width (gym: tasks)

    epochs: int = Field(10, ge=1)
    steps_per_epoch: int = Field(10_240, ge=1, description="environment steps (all envs) between evaluations")
    budget_multiplier: float = Field(1.0, ge=1)  # teacher-only arm at matched gradient steps
    eval_episodes: int = Field(10, ge=1)
    step_limit: int | None = Field(None, ge=1)  # episode length cap (default: the environment's own)
    eval_step_limit: int = Field(27_000, ge=1)  # safety cap on one greedy evaluation
    checkpoint_every: int = Field(1, ge=0)

    @field_validator("task")
    @classmethod
    def _known_env(cls, value: str, info: ValidationInfo) -> str:
        return environments.validate_env_name(value, check_installed=checks_files(info))

    @model_validator(mode="after")
    def _shapes_fit(self) -> LoTRLConfig:
        if self.rollout_size % self.num_minibatches:
            raise ValueError(
                f"num_minibatches: {self.num_minibatches} does not divide a rollout of "
                f"num_envs * num_steps = {self.rollout_size} steps"
            )
        if self.steps_per_epoch % self.rollout_size:
            raise ValueError(
                f"steps_per_epoch: {self.steps_per_epoch} is not a whole number of rollouts of "
                f"num_envs * num_steps = {self.rollout_size} steps"
            )
        return self

    @property
    def rollout_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        return self.rollout_size // self.num_minibatches

    @property
    def rollouts_per_epoch(self) -> int:
        """The same for every arm: a longer budget runs more epochs of it (one evaluation grid for all arms)."""
        return max(1, round(self.steps_per_epoch / self.rollout_size))

    @property
    def total_rollouts(self) -> int:
        """`epochs` x `budget_multiplier` epochs of rollouts, rounded to whole rollouts (not whole epochs: the
        multiplier of a model-steps arm is rarely whole)."""
        return max(1, round(self.rollouts_per_epoch * self.epochs * self.budget_multiplier))

    @property
    def epochs_to_run(self) -> int:
        """Whole epochs of `rollouts_per_epoch`, the last one shorter when the budget ends inside it."""
        return math.ceil(self.total_rollouts / self.rollouts_per_epoch)

    def rollouts_in(self, epoch: int) -> int:
        return min(self.rollouts_per_epoch, self.total_rollouts - (epoch - 1) * self.rollouts_per_epoch)


def gradient_steps_per_teacher_update(cfg: LoTRLConfig, n: int) -> float:
    """Minibatch gradient steps of all models per teacher update once the buffer is full: U teacher steps, K*U joint
    student steps, and K*N passes of ceil(buffer / student batch) steps. Teacher-only PPO makes U."""
    teacher = cfg.update_epochs * cfg.num_minibatches
    batch = cfg.student_batch_size or cfg.minibatch_size
    per_pass = math.ceil(cfg.buffer_rollouts * cfg.rollout_size / batch)
    return teacher + cfg.num_students * (teacher * cfg.joint_student_step + n * per_pass)


def metrics(cfg: LoTRLConfig) -> dict[str, str | None]:
    out: dict[str, str | None] = {
        "teacher/eval_return": "max",
        "teacher/eval_return_auc": "max",
        "teacher/best_eval_return": "max",
        "teacher/train_return": "max",
        "teacher/train_episodes": None,
        "loss/policy": None,
        "loss/value": "min",
        "loss/entropy": None,
        "kl/approx": None,
        "steps/env": None,
        "steps/eval_env": None,
        "steps/teacher_updates": None,
        "steps/teacher": None,
        "steps/student": None,
        "steps/model": None,
        "time/env_steps_per_s": "max",
        "time/teacher_update_s": "min",
        "time/train_s": "min",
    }
    if cfg.arm == "lot":
        out |= {"student/eval_return": "max", "agreement/buffer": "max", "kl/teacher_term": None, "kl/student": "min"}
        if cfg.num_students > 1:
            out |= {f"student{i}/eval_return": "max" for i in range(cfg.num_students)}
    return out


def model_steps_multiplier(params: dict[str, Any]) -> float:
    """Gradient steps of LoT's teacher and students per teacher update, over teacher-only PPO's."""
    cfg = LoTRLConfig.model_validate({k: v for k, v in lot.filled(params, LoTRLConfig).items() if v is not None})
    return gradient_steps_per_teacher_update(cfg, cfg.student_steps) / (cfg.update_epochs * cfg.num_minibatches)


FIELDS = lot.TeacherOnlyFields(
    LoTRLConfig,
    lot.PULL_FIELDS | {"student_weight_decay"},
    frozenset({"student_steps", "num_students", "joint_student_step", "buffer_rollouts", "student_batch_size"}),
    model_steps_multiplier,
)


def selection_split(params: dict[str, Any]) -> str:
    """The objective's returns come from greedy episodes on separately seeded environments, not from a data split."""
    return "greedy evaluation episodes"


def fixed_arms(cfg: LoTRLConfig, plan: ArmPlan) -> list[dict[str, Any]]:
    """Teacher-only PPO at each budget the spec's `baseline` asks for: `teacher_steps` (the same environment steps),
    `model_steps` (as many gradient steps as LoT's teacher and students: one arm per N the sweep can pick)."""
    arms: list[dict[str, Any]] = []
    if "teacher_steps" in plan.budgets:
        arms.append(
            {"label": "teacher_only", "arm": "teacher_only", **lot.teacher_only_overrides(FIELDS, "teacher_steps")}
        )
    if "model_steps" in plan.budgets:
        teacher = cfg.update_epochs * cfg.num_minibatches
        neutral = lot.teacher_only_overrides(FIELDS, "model_steps")
        for n in sorted(set(plan.choices.get("student_steps", [cfg.student_steps]))):
            multiplier = gradient_steps_per_teacher_update(cfg, n) / teacher
            arms.append(
                {
                    "label": f"teacher_only-N{n}",
                    "arm": "teacher_only",
                    **neutral,
                    "student_steps": n,
                    "budget_multiplier": multiplier,
                }
            )
    return arms


def baselines(trial: dict[str, Any], trials: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any] | None]]:
    return lot.baselines(trial, trials, FIELDS)


def uncompared(trials: list[dict[str, Any]]) -> list[str]:
    return lot.uncompared(trials, FIELDS)


def compare(trials: list[dict[str, Any]], metric_names: list[str]) -> list[dict[str, Any]]:
    """LoT minus teacher-only PPO, paired by seed, as the supervised job compares them."""
    return lot.compare(trials, metric_names, FIELDS)


# ---------------------------------------------------------------------------------------------- networks


def layer(module: nn.Module, std: float = math.sqrt(2), bias: float = 0.0) -> nn.Module:
    """Orthogonal weights, constant bias: the initialisation PPO implementations use."""
    nn.init.orthogonal_(module.weight, std)
    nn.init.constant_(module.bias, bias)
    return module


def body(kind: environments.EnvKind, obs_shape: tuple[int, ...], hidden: int) -> tuple[nn.Module, int]:
    """The feature extractor for one kind of observation, and its output width."""
    if kind == "mlp":
        net = nn.Sequential(
            layer(nn.Linear(obs_shape[0], hidden)), nn.Tanh(), layer(nn.Linear(hidden, hidden)), nn.Tanh()
        )
        return net, hidden
    if kind == "minatar":  # 10x10xC boolean planes: one 3x3 conv, as MinAtar's baselines
        channels = obs_shape[-1]
        net = nn.Sequential(
            layer(nn.Conv2d(channels, 16, 3)),
            nn.ReLU(),
            nn.Flatten(),
            layer(nn.Linear(16 * (obs_shape[0] - 2) * (obs_shape[1] - 2), 128)),
            nn.ReLU(),
        )
        return net, 128
    net = nn.Sequential(  # the Nature CNN on 4 stacked 84x84 frames
        layer(nn.Conv2d(obs_shape[0], 32, 8, stride=4)),
        nn.ReLU(),
        layer(nn.Conv2d(32, 64, 4, stride=2)),
        nn.ReLU(),
        layer(nn.Conv2d(64, 64, 3, stride=1)),
        nn.ReLU(),
        nn.Flatten(),
        layer(nn.Linear(64 * 7 * 7, 512)),
        nn.ReLU(),
    )
    return net, 512


class Agent(nn.Module):
    """A policy (logits over actions) with, for the teacher, a value head. MLP agents keep separate actor and critic
    networks; CNN agents share the convolutional body."""

    def __init__(self, kind, obs_shape, n_actions: int, hidden: int, critic: bool) -> None:
        super().__init__()
        self.kind = kind
        self.actor_body, width = body(kind, obs_shape, hidden)
        self.actor_head = layer(nn.Linear(width, n_actions), std=0.01)
        self.critic_body = body(kind, obs_shape, hidden)[0] if critic and kind == "mlp" else None
        self.critic_head = layer(nn.Linear(width, 1), std=1.0) if critic else None

    def prepare(self, obs: torch.Tensor) -> torch.Tensor:
        if self.kind == "minatar":
            return obs.float().permute(0, 3, 1, 2)  # channels last -> first
        if self.kind == "atari":
            return obs.float() / 255.0
        return obs.float()

    def logits(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor_head(self.actor_body(self.prepare(obs)))

    def forward(self, obs: torch.Tensor, value: bool = True) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """(logits, value) from one observation batch; the logits alone without `value` (packed calls, where a
        student has no value head)."""
        x = self.prepare(obs)
        features = self.actor_body(x)
        if not value:
            return self.actor_head(features)
        critic_features = features if self.critic_body is None else self.critic_body(x)
        return self.actor_head(features), self.critic_head(critic_features).squeeze(-1)


def build_agent(cfg: LoTRLConfig, obs_shape, n_actions: int, role: str, index: int = 0) -> Agent:
    torch.manual_seed(models.init_seed(cfg.seed, role, index))
    return Agent(environments.env_kind(cfg.task), obs_shape, n_actions, cfg.hidden, critic=role == "teacher")


# ---------------------------------------------------------------------------------------------- losses


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    ended: torch.Tensor,
    last_value: torch.Tensor,
    gamma: float | torch.Tensor,
    lam: float,
    trace: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and value targets over a rollout of shape (steps, envs).

    ended[t] = 1 when the transition at step t ended its episode (the observation after it starts a new one);
    last_value = V(observation after the rollout). A pack gives `gamma` and `trace` (gamma * lambda, multiplied
    in double as Python multiplies the numbers) as one value per env."""
    trace = gamma * lam if trace is None else trace
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(last_value)
    for t in reversed(range(rewards.size(0))):
        next_value = last_value if t == rewards.size(0) - 1 else values[t + 1]
        not_ended = 1.0 - ended[t]
        delta = rewards[t] + gamma * next_value * not_ended - values[t]
        running = delta + trace * not_ended * running
        advantages[t] = running
    return advantages, advantages + values


def clipped_policy_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip: float
) -> torch.Tensor:
    """PPO's pessimistic objective, as a loss: mean of max(-A r, -A clip(r, 1-eps, 1+eps)), r = pi/pi_old."""
    ratio = torch.exp(log_prob - old_log_prob)
    return torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)).mean()


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, targets: torch.Tensor, clip: float | None
) -> torch.Tensor:
    """0.5 * squared error to the GAE targets; with `clip`, the larger of the plain and the clipped error."""
    plain = (values - targets) ** 2
    if clip is None:
        return 0.5 * plain.mean()
    clipped = (old_values + (values - old_values).clamp(-clip, clip) - targets) ** 2
    return 0.5 * torch.max(plain, clipped).mean()


def teacher_kl_term(teacher_logits: torch.Tensor, student_logits: list[torch.Tensor], cfg: LoTRLConfig) -> torch.Tensor:
    """sum_i lambda_i KL(S_i || T) into the teacher only (the students' logits are detached); the loss adds it
    times alpha."""
    term = torch.zeros((), device=teacher_logits.device)
    if not student_logits:  # the teacher-only arm
        return term
    for weight, logits in zip(cfg.lambdas, student_logits, strict=True):
        kl = kl_divergence(logits.detach(), teacher_logits, cfg.temperature)
        if cfg.symmetric_kl:
            kl = kl + kl_divergence(teacher_logits, logits.detach(), cfg.temperature)
        term = term + weight * kl
    return term


def student_imitation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(T || S) into the student only (the teacher's logits are detached); no alpha, as in the public code."""
    return kl_divergence(teacher_logits.detach(), student_logits, temperature)


# ---------------------------------------------------------------------------------------------- rollouts


class Rollout(NamedTuple):
    obs: torch.Tensor  # (steps, envs, *obs_shape)
    actions: torch.Tensor
    log_probs: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor  # truncated episodes: + gamma * V(last observation)
    ended: torch.Tensor
    last_value: torch.Tensor


def observation_tensor(obs: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(obs if obs.dtype != np.bool_ else obs.astype(np.uint8), device=device)


@torch.no_grad()
def collect_rollout(teacher: Agent, envs, obs: np.ndarray, cfg: LoTRLConfig, device, precision: str):
    """The teacher acts for `num_steps` steps in every env. Returns (rollout, next observation, finished episodes'
    returns)."""
    steps = []
    returns: list[float] = []
    for _ in range(cfg.num_steps):
        obs_t = observation_tensor(obs, device)
        with autocast(device, precision):
            logits, value = teacher(obs_t)
        dist = torch.distributions.Categorical(logits=logits.float())
        action = dist.sample()
        next_obs, reward, terminated, truncated, info = envs.step(action.cpu().numpy())
        reward = torch.as_tensor(reward, dtype=torch.float32, device=device)
        cut = np.flatnonzero(truncated & ~terminated)  # a time limit, not the game, ended these: bootstrap
        if len(cut):
            cut = torch.as_tensor(cut, device=device)
            final = observation_tensor(np.stack([info["final_obs"][i] for i in cut.tolist()]), device)
            with autocast(device, precision):
                reward[cut] += cfg.gamma * teacher(final)[1].float()
        mask, finished = environments.finished_episodes(info)
        returns += finished.tolist()
        ended = torch.as_tensor(terminated | truncated, dtype=torch.float32, device=device)
        steps.append((obs_t, action, dist.log_prob(action), value.float(), reward, ended))
        obs = next_obs
    with autocast(device, precision):
        last_value = teacher(observation_tensor(obs, device))[1].float()
    columns = [torch.stack(c) for c in zip(*steps, strict=True)]
    return Rollout(*columns, last_value), obs, returns


# ---------------------------------------------------------------------------------------------- updates


def teacher_update(
    teacher, students, optimizers, rollout: Rollout, cfg: LoTRLConfig, generator, device, precision
) -> dict[str, float]:
    """`update_epochs` passes over the rollout in minibatches; each minibatch is one step of the teacher (PPO + the
    LoT term) and, with `joint_student_step`, one imitation step of every student."""
    advantages, targets = gae(
        rollout.rewards, rollout.values, rollout.ended, rollout.last_value, cfg.gamma, cfg.gae_lambda
    )
    flat = lambda x: x.flatten(0, 1)  # noqa: E731
    obs, actions, old_log_probs, old_values = map(
        flat, (rollout.obs, rollout.actions, rollout.log_probs, rollout.values)
    )
    advantages, targets = flat(advantages), flat(targets)
    terms: list[tuple[torch.Tensor, ...]] = []  # per minibatch: policy, value, entropy, approx KL (+ LoT term)
    for _ in range(cfg.update_epochs):
        order = torch.randperm(cfg.rollout_size, generator=generator).to(device)
        for index in order.split(cfg.minibatch_size):
            with autocast(device, precision):
                logits, values = teacher(obs[index])
                with torch.set_grad_enabled(cfg.joint_student_step):
                    student_logits = [s.logits(obs[index]).float() for s in students]
            logits, values = logits.float(), values.float()
            dist = torch.distributions.Categorical(logits=logits)
            log_probs = dist.log_prob(actions[index])
            adv = advantages[index]
            if cfg.normalize_advantages and len(index) > 1:
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            policy = clipped_policy_loss(log_probs, old_log_probs[index], adv, cfg.clip_coef)
            v_loss = value_loss(
                values, old_values[index], targets[index], cfg.clip_coef if cfg.clip_value_loss else None
            )
            entropy = dist.entropy().mean()
            loss = policy + cfg.vf_coef * v_loss - cfg.ent_coef * entropy
            term = (policy, v_loss, entropy)
            if students:  # (the teacher-only arm launches none of this)
                lot_term = teacher_kl_term(logits, student_logits, cfg)
                loss = loss + cfg.alpha * lot_term
                if cfg.joint_student_step:  # disjoint parameters: one backward serves every model
                    loss = loss + sum(student_imitation_loss(s, logits, cfg.temperature) for s in student_logits)
                term += (lot_term,)
            loss.backward()
            models_to_step = [teacher, *students] if cfg.joint_student_step else [teacher]
            for model, (optimizer, _) in zip(models_to_step, optimizers, strict=False):
                step(model, optimizer, cfg.max_grad_norm)
            with torch.no_grad():
                log_ratio = log_probs - old_log_probs[index]
                approx_kl = (log_ratio.exp() - 1 - log_ratio).mean()  # Schulman's k3 estimator of KL(old || new)
            terms.append((*(t.detach() for t in term), approx_kl))
    means = torch.stack([torch.stack(t) for t in terms]).mean(0).tolist()  # one device sync per update
    stats = dict(zip(["loss/policy", "loss/value", "loss/entropy"], means[:3], strict=True))
    stats |= {"kl/approx": means[-1], "kl/teacher_term": means[3] if students else 0.0, "updates": len(terms)}
    return stats


def student_passes(
    teacher: Agent, students, optimizers, buffer: deque, cfg: LoTRLConfig, generator, device, precision
) -> int:
    """N passes of every student over the buffered observations, imitating the current teacher (no teacher graph).
    Reads only the buffer: students never step an environment. Returns the minibatch steps each student made."""
    if not students:
        return 0
    observations = torch.cat(list(buffer))
    batch = cfg.student_batch_size or cfg.minibatch_size
    with autocast(device, precision), torch.no_grad():  # the teacher stays as it is through the N passes
        targets = torch.cat([teacher.logits(chunk).float() for chunk in observations.split(batch)])
    steps = 0
    for _ in range(cfg.student_steps):
        order = torch.randperm(len(observations), generator=generator).to(device)
        for index in order.split(batch):
            obs, target = observations[index], targets[index]
            with autocast(device, precision):
                for student, (optimizer, _) in zip(students, optimizers, strict=True):
                    student_imitation_loss(student.logits(obs).float(), target, cfg.temperature).backward()
                    step(student, optimizer, cfg.max_grad_norm)
            steps += 1
    return steps


def step(model: nn.Module, optimizer, clip: float | None) -> None:
    if clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def make_optimizer(model: nn.Module, cfg: LoTRLConfig, total_updates: int, weight_decay: float = 0.0):
    """Adam and a schedule stepped once per teacher update, from lr to lr_min."""
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=cfg.adam_eps, weight_decay=weight_decay)
    floor = cfg.lr_min / cfg.lr

    def factor(update: int) -> float:
        progress = min(update, total_updates) / max(1, total_updates)
        if cfg.schedule == "linear":
            return 1.0 - (1.0 - floor) * progress
        if cfg.schedule == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def greedy_returns(agent: Agent, envs, seeds: list[int], device, step_limit: int) -> tuple[np.ndarray, int]:
    """One episode per env with the argmax action, each env reset with its seed (the same episodes for every agent
    evaluated with these seeds). Returns (episodic returns, environment steps taken)."""
    obs, _ = envs.reset(seed=seeds)
    totals, running = np.full(len(seeds), np.nan), np.zeros(len(seeds))
    steps = 0
    agent.eval()
    while np.isnan(totals).any() and steps < step_limit:
        actions = agent.logits(observation_tensor(obs, device)).argmax(-1).cpu().numpy()
        obs, reward, terminated, truncated, _ = envs.step(actions)
        steps += 1
        running += reward
        ended = terminated | truncated
        first = ended & np.isnan(totals)
        totals[first] = running[first]
        running[ended] = 0.0
    agent.train()
    totals[np.isnan(totals)] = running[np.isnan(totals)]  # past the safety cap: the partial return
    return totals, steps * len(seeds)


@torch.no_grad()
def agreement_and_kl(teacher: Agent, students, obs: torch.Tensor, cfg: LoTRLConfig) -> tuple[float, float]:
    """Students' greedy-action agreement with the teacher and KL(T || S), on the latest rollout's observations."""
    t_logits = teacher.logits(obs).float()
    agree = [(s.logits(obs).argmax(-1) == t_logits.argmax(-1)).float().mean().item() for s in students]
    kls = [kl_divergence(t_logits, s.logits(obs).float(), cfg.temperature).item() for s in students]
    return float(np.mean(agree)), float(np.mean(kls))


# ---------------------------------------------------------------------------------------------- training


def epoch_metrics(
    eval_returns: list[float], train_return: float, train_episodes: int, losses: dict[str, float]
) -> dict[str, float]:
    """An epoch's teacher scores (its greedy returns so far, the last one this epoch's) and its update's losses."""
    return {
        "teacher/eval_return": eval_returns[-1],
        "teacher/eval_return_auc": float(np.mean(eval_returns)),
        "teacher/best_eval_return": float(np.max(eval_returns)),
        "teacher/train_return": train_return,
        "teacher/train_episodes": train_episodes,
        **losses,
    }


def count_update(
    counters: dict[str, Any], cfg: LoTRLConfig, updates: int, extra: int, has_students: bool, started: float
) -> None:
    """One teacher update counted: its seconds, its environment steps, the teacher's and the students' steps."""
    counters["update_seconds"] += time.perf_counter() - started
    counters["env_steps"] += cfg.rollout_size
    counters["teacher_updates"] += 1
    counters["teacher_steps"] += updates
    counters["student_steps"] += (updates if cfg.joint_student_step and has_students else 0) + extra


def step_metrics(counters: dict[str, Any], n_students: int) -> dict[str, float]:
    """What the training has cost so far, in steps and seconds."""
    return {
        "steps/env": counters["env_steps"],
        "steps/teacher_updates": counters["teacher_updates"],
        "steps/teacher": counters["teacher_steps"],
        "steps/student": counters["student_steps"],
        "steps/model": counters["teacher_steps"] + counters["student_steps"] * n_students,
        "time/env_steps_per_s": counters["env_steps"] / counters["train_seconds"],
        "time/teacher_update_s": counters["update_seconds"] / counters["teacher_updates"],
        "time/train_s": counters["train_seconds"],
    }


def train(config: LoTRLConfig | dict, reporter: Reporter | None = None) -> dict[str, float]:
    cfg = LoTRLConfig.model_validate(config)
    reporter = reporter or Reporter()
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    envs = environments.make_vector_env(cfg.task, cfg.num_envs, cfg.step_limit)
    eval_envs = environments.make_vector_env(cfg.task, cfg.eval_episodes, cfg.step_limit, clip_rewards=False)
    eval_seeds = [1_000_000 + 1_000 * cfg.seed + i for i in range(cfg.eval_episodes)]
    obs_shape, n_actions = envs.single_observation_space.shape, int(envs.single_action_space.n)

    teacher = build_agent(cfg, obs_shape, n_actions, "teacher").to(device).train()
    n_students = cfg.num_students if cfg.arm == "lot" else 0
    students = [build_agent(cfg, obs_shape, n_actions, "student", i).to(device).train() for i in range(n_students)]
    total_updates = cfg.total_rollouts
    optimizers = [make_optimizer(teacher, cfg, total_updates)]
    optimizers += [make_optimizer(s, cfg, total_updates, cfg.student_weight_decay) for s in students]
    generator = torch.Generator().manual_seed(cfg.seed)
    buffer: deque[torch.Tensor] = deque(maxlen=cfg.buffer_rollouts)

    stateful = {"teacher": teacher, "generator": generator}
    for i, (model, (opt, sched)) in enumerate(zip([teacher, *students], optimizers, strict=True)):
        name = "teacher" if i == 0 else f"student{i - 1}"
        stateful |= {name: model, f"{name}_opt": opt, f"{name}_sched": sched}
    counters = {
        "epoch": 0,
        "env_steps": 0,
        "eval_env_steps": 0,
        "teacher_updates": 0,
        "teacher_steps": 0,
        "student_steps": 0,
        "train_seconds": 0.0,
        "update_seconds": 0.0,
        "eval_returns": [],
        "train_return": float("nan"),
    }
    saved = reporter.restore()
    if saved is not None:  # a restarted trial continues after its last checkpoint; its buffer refills
        restore_into(saved, {k: v for k, v in stateful.items() if k != "generator"})
        generator.set_state(saved["generator"])
        counters = dict(saved["counters"])
    obs, _ = envs.reset(seed=[cfg.seed * 10_000 + counters["epoch"] * 100 + i for i in range(cfg.num_envs)])

    precision = "bf16" if uses_bf16(device, cfg.precision) else "fp32"  # decided once, not at every env step
    metrics: dict[str, float] = {}
    for epoch in range(counters["epoch"] + 1, cfg.epochs_to_run + 1):
        epoch_returns: list[float] = []
        epoch_start = time.perf_counter()
        for _ in range(cfg.rollouts_in(epoch)):
            rollout, obs, finished = collect_rollout(teacher, envs, obs, cfg, device, precision)
            epoch_returns += finished
            update_start = time.perf_counter()
            stats = teacher_update(teacher, students, optimizers, rollout, cfg, generator, device, precision)
            buffer.append(rollout.obs.flatten(0, 1))
            extra = student_passes(teacher, students, optimizers[1:], buffer, cfg, generator, device, precision)
            for _, schedule in optimizers:
                schedule.step()
            synchronize(device)
            count_update(counters, cfg, stats["updates"], extra, bool(students), update_start)
        counters["train_seconds"] += time.perf_counter() - epoch_start
        if not all(math.isfinite(v) for v in stats.values()):
            raise FloatingPointError(f"PPO losses are not finite in epoch {epoch}: {stats}")

        teacher_returns, eval_steps = greedy_returns(teacher, eval_envs, eval_seeds, device, cfg.eval_step_limit)
        counters["eval_env_steps"] += eval_steps
        counters["eval_returns"] = counters["eval_returns"] + [float(teacher_returns.mean())]
        if epoch_returns:
            counters["train_return"] = float(np.mean(epoch_returns))
        losses = {k: v for k, v in stats.items() if k != "updates"}
        metrics = epoch_metrics(counters["eval_returns"], counters["train_return"], len(epoch_returns), losses)
        metrics |= step_metrics(counters, n_students)
        if students:
            per_student = []
            for i, student in enumerate(students):
                returns, steps_taken = greedy_returns(student, eval_envs, eval_seeds, device, cfg.eval_step_limit)
                counters["eval_env_steps"] += steps_taken
                per_student.append(float(returns.mean()))
                if n_students > 1:
                    metrics[f"student{i}/eval_return"] = per_student[-1]
            agreement, student_kl = agreement_and_kl(teacher, students, buffer[-1], cfg)
            metrics |= {
                "student/eval_return": float(np.mean(per_student)),
                "agreement/buffer": agreement,
                "kl/student": student_kl,
            }
        metrics["steps/eval_env"] = counters["eval_env_steps"]
        counters["epoch"] = epoch
        checkpoint = None
        if cfg.checkpoint_every and (epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs_to_run):
            checkpoint = {"counters": dict(counters), "generator": generator.get_state()}
            checkpoint |= state_of({k: v for k, v in stateful.items() if k != "generator"})
        if saved is not None:
            metrics["trial/resumed_from_epoch"] = saved["counters"]["epoch"]  # (a copy: counters moved on)
        reporter.report(metrics, epoch, checkpoint=checkpoint)
    envs.close()
    eval_envs.close()
    return metrics


# ---------------------------------------------------------------------------------------------- packed training

# What the members of one pack may differ in; every other field (environment, envs, steps, minibatches, N, K,
# buffer, network width, epochs) shapes the computation and must be equal across the pack.
PACK_VARIES = frozenset(
    {"seed", "alpha", "temperature", "student_weights", "lr", "lr_min", "ent_coef", "vf_coef", "clip_coef"}
    | {"max_grad_norm", "gamma", "gae_lambda", "student_weight_decay"}
)
PACKED_TASKS = tuple(environments.BATCHED)  # the environments stepped as arrays


def check_pack(cfg: LoTRLConfig) -> None:
    """What a packed lot_rl trial cannot train, named by its field."""
    if cfg.task not in PACKED_TASKS:
        raise ValueError(
            f"task: {cfg.task} does not pack yet (packs step {', '.join(PACKED_TASKS)} as arrays): "
            "set resources.pack to 1"
        )


@dataclass(frozen=True)
class PackTerms:
    """Each member's PPO and LoT settings as columns (P,) on the device."""

    gamma: torch.Tensor
    trace: torch.Tensor  # gamma * gae_lambda
    clip: torch.Tensor
    ent: torch.Tensor
    vf: torch.Tensor
    alpha: torch.Tensor
    temperature: torch.Tensor
    lambdas: torch.Tensor  # (K, P)

    @classmethod
    def of(cls, cfgs: list[LoTRLConfig], device) -> PackTerms:
        column = lambda values: packing.member_column(values, device)  # noqa: E731
        return cls(
            column([c.gamma for c in cfgs]),
            column([c.gamma * c.gae_lambda for c in cfgs]),
            column([c.clip_coef for c in cfgs]),
            column([c.ent_coef for c in cfgs]),
            column([c.vf_coef for c in cfgs]),
            column([c.alpha for c in cfgs]),
            column([c.temperature for c in cfgs]),
            torch.tensor([c.lambdas for c in cfgs], dtype=torch.float32, device=device).T,
        )

    def at(self, members: list[int]) -> PackTerms:
        index = torch.tensor(members, device=self.gamma.device)
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return PackTerms(**{n: v[:, index] if n == "lambdas" else v[index] for n, v in fields.items()})


def by_member(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor (P, N, ...) at each member's own indices (P, M): (P, M, ...)."""
    shape = index.shape + tensor.shape[2:]
    expanded = index.view(*index.shape, *([1] * (tensor.dim() - 2))).expand(shape)
    return torch.gather(tensor, 1, expanded)


@torch.no_grad()
def collect_pack_rollout(teacher: packing.StackedModel, envs, obs: np.ndarray, cfg, terms: PackTerms, samplers, device):
    """`collect_rollout` for a pack: one vmapped teacher call per step over P x E envs, each member's actions drawn
    from its own generator as its twin draws them. Returns (rollout (steps, P, E, ...), next observation, each
    member's finished episodes' returns)."""
    members, per = terms.gamma.shape[0], cfg.num_envs
    steps, returns = [], [[] for _ in range(members)]
    for _ in range(cfg.num_steps):
        obs_t = observation_tensor(obs, device).view(members, per, *obs.shape[1:])
        logits, value = teacher(obs_t)
        # (no argument checks: one member's NaN must not stop the pack; it fails alone after its update)
        dist = torch.distributions.Categorical(logits=logits.float(), validate_args=False)
        probs = torch.where(torch.isfinite(dist.probs), dist.probs, 1.0 / dist.probs.shape[-1])
        action = torch.stack(
            [torch.multinomial(probs[m], 1, True, generator=g).T.reshape(per) for m, g in enumerate(samplers)]
        )
        next_obs, reward, terminated, truncated, final, finished = envs.step(action.reshape(-1).cpu().numpy())
        reward = torch.as_tensor(reward, dtype=torch.float32, device=device).view(members, per)
        cut = torch.as_tensor(truncated & ~terminated, device=device).view(members, per)
        if cut.any():  # a time limit, not the game, ended these: bootstrap from their last observation
            final_obs = torch.as_tensor(np.nan_to_num(final), device=device).view(members, per, *obs.shape[1:])
            bootstrap = reward + terms.gamma[:, None] * teacher(final_obs)[1].float()
            reward = torch.where(cut, bootstrap, reward)
        for index in np.flatnonzero(~np.isnan(finished)):
            returns[index // per].append(float(finished[index]))
        ended = torch.as_tensor(terminated | truncated, dtype=torch.float32, device=device).view(members, per)
        steps.append((obs_t, action, dist.log_prob(action), value.float(), reward, ended))
        obs = next_obs
    last_value = teacher(observation_tensor(obs, device).view(members, per, *obs.shape[1:]))[1].float()
    columns = [torch.stack(c) for c in zip(*steps, strict=True)]
    return Rollout(*columns, last_value), obs, returns


def pack_teacher_update(
    teacher: packing.StackedModel, students, optimizers, rollout: Rollout, cfg, terms: PackTerms, generators, device
) -> dict[str, torch.Tensor]:
    """`teacher_update` for a pack: each member's advantages, minibatch order (its own generator), losses and
    optimizer steps, as columns; returns each statistic as a column (P,)."""
    steps, members, per = rollout.rewards.shape
    flat_envs = lambda x: x.reshape(steps, members * per)  # noqa: E731
    advantages, targets = gae(
        flat_envs(rollout.rewards),
        flat_envs(rollout.values),
        flat_envs(rollout.ended),
        rollout.last_value.reshape(-1),
        terms.gamma.repeat_interleave(per),
        0.0,
        terms.trace.repeat_interleave(per),
    )
    by_step = lambda x: x.reshape(steps, members, per, *x.shape[2:]).transpose(0, 1).flatten(1, 2)  # noqa: E731
    obs = rollout.obs.transpose(0, 1).flatten(1, 2)  # (P, steps * envs, ...) in its twin's order
    actions, old_log_probs, old_values = (x.transpose(0, 1).flatten(1, 2) for x in rollout[1:4])
    advantages, targets = by_step(advantages), by_step(targets)
    terms_seen: list[torch.Tensor] = []
    for _ in range(cfg.update_epochs):
        orders = torch.stack([torch.randperm(cfg.rollout_size, generator=g) for g in generators]).to(device)
        for index in orders.split(cfg.minibatch_size, dim=1):
            mb_obs = by_member(obs, index)
            logits, values = teacher(mb_obs)
            with torch.set_grad_enabled(cfg.joint_student_step):
                student_logits = [s(mb_obs, value=False).float() for s in students]
            logits, values = logits.float(), values.float()
            dist = torch.distributions.Categorical(logits=logits, validate_args=False)
            log_probs = dist.log_prob(by_member(actions, index))
            old = by_member(old_log_probs, index)
            adv = by_member(advantages, index)
            if cfg.normalize_advantages and index.shape[1] > 1:
                adv = (adv - adv.mean(1, keepdim=True)) / (adv.std(1, keepdim=True) + 1e-8)
            ratio = torch.exp(log_probs - old)
            clip = terms.clip[:, None]
            policy = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip)).mean(1)
            mb_targets, mb_old_values = by_member(targets, index), by_member(old_values, index)
            plain = (values - mb_targets) ** 2
            if cfg.clip_value_loss:
                clipped = (mb_old_values + torch.clamp(values - mb_old_values, -clip, clip) - mb_targets) ** 2
                v_loss = 0.5 * torch.max(plain, clipped).mean(1)
            else:
                v_loss = 0.5 * plain.mean(1)
            entropy = dist.entropy().mean(1)
            loss = policy + terms.vf * v_loss - terms.ent * entropy
            seen = [policy, v_loss, entropy]
            if students:
                lot_term = torch.zeros_like(loss)
                for weight, s_logits in zip(terms.lambdas, student_logits, strict=True):
                    kl = member_kl(s_logits.detach(), logits, terms.temperature)
                    if cfg.symmetric_kl:
                        kl = kl + member_kl(logits, s_logits.detach(), terms.temperature)
                    lot_term = lot_term + weight * kl
                loss = loss + terms.alpha * lot_term
                if cfg.joint_student_step:
                    loss = loss + sum(member_kl(logits.detach(), s, terms.temperature) for s in student_logits)
                seen.append(lot_term)
            loss.sum().backward()
            for optimizer in optimizers if cfg.joint_student_step else optimizers[:1]:
                optimizer.step()
                optimizer.zero_grad()
            with torch.no_grad():
                log_ratio = log_probs - old
                seen.append((log_ratio.exp() - 1 - log_ratio).mean(1))
            terms_seen.append(torch.stack([t.detach() for t in seen]))
    means = torch.stack(terms_seen).mean(0)  # (statistics, P)
    stats = {"loss/policy": means[0], "loss/value": means[1], "loss/entropy": means[2], "kl/approx": means[-1]}
    stats["kl/teacher_term"] = means[3] if students else torch.zeros_like(means[0])
    return stats | {"updates": len(terms_seen)}


def pack_student_passes(teacher, students, optimizers, buffer: deque, cfg, terms: PackTerms, generators, device) -> int:
    """`student_passes` for a pack: each member's students over its own buffer, in its own order."""
    if not students:
        return 0
    observations = torch.cat(list(buffer), dim=1)  # (P, buffered, ...)
    batch = cfg.student_batch_size or cfg.minibatch_size
    with torch.no_grad():  # the teachers stay as they are through the N passes
        targets = torch.cat([teacher(chunk, value=False).float() for chunk in observations.split(batch, dim=1)], 1)
    steps = 0
    for _ in range(cfg.student_steps):
        orders = torch.stack([torch.randperm(observations.shape[1], generator=g) for g in generators]).to(device)
        for index in orders.split(batch, dim=1):
            obs, target = by_member(observations, index), by_member(targets, index)
            for student, optimizer in zip(students, optimizers, strict=True):
                member_kl(target, student(obs, value=False).float(), terms.temperature).sum().backward()
                optimizer.step()
                optimizer.zero_grad()
            steps += 1
    return steps


@torch.no_grad()
def pack_greedy_returns(agent: packing.StackedModel, envs, seeds: list[list[int]], device, step_limit: int):
    """`greedy_returns` for a pack: each member's agent on its own seeded episodes. (returns (P, episodes),
    environment steps each member's own evaluation took)."""
    members, episodes = len(seeds), len(seeds[0])
    obs = envs.reset([seed for member in seeds for seed in member])
    totals, running = np.full(members * episodes, np.nan), np.zeros(members * episodes)
    taken = np.zeros(members, dtype=np.int64)
    steps = 0
    while np.isnan(totals).any() and steps < step_limit:
        logits = agent(observation_tensor(obs, device).view(members, episodes, -1), value=False)
        obs, reward, terminated, truncated, _, _ = envs.step(logits.argmax(-1).reshape(-1).cpu().numpy())
        steps += 1
        taken += np.isnan(totals).reshape(members, episodes).any(1)  # a member's loop ran while one was unfinished
        running += reward
        ended = terminated | truncated
        first = ended & np.isnan(totals)
        totals[first] = running[first]
        running[ended] = 0.0
    totals[np.isnan(totals)] = running[np.isnan(totals)]
    return totals.reshape(members, episodes), taken * episodes


def pack_schedule(cfgs: list[LoTRLConfig], total_updates: int, device) -> Callable[[int], torch.Tensor]:
    """`make_optimizer`'s schedule factor for each member (its own lr and lr_min), after `update` updates."""
    floors = [c.lr_min / c.lr for c in cfgs]
    schedule = cfgs[0].schedule

    def factor(update: int) -> torch.Tensor:
        progress = min(update, total_updates) / max(1, total_updates)
        if schedule == "linear":
            values = [1.0 - (1.0 - floor) * progress for floor in floors]
        elif schedule == "cosine":
            values = [floor + (1.0 - floor) * 0.5 * (1 + math.cos(math.pi * progress)) for floor in floors]
        else:
            values = [1.0] * len(floors)
        return torch.tensor(values, dtype=torch.float64, device=device)

    return factor


def train_pack(configs: list[LoTRLConfig | dict], pack: PackReporter | None = None) -> dict[int, dict[str, float]]:
    """`train` for P configs at once (packing.py): P x E environments stepped as arrays (`BatchedEnvs`), one
    vmapped call of the teachers per step, each member's own action and minibatch generators, its own
    hyperparameters as columns. Returns each member's final metrics, for the members that did not fail."""
    cfgs = [LoTRLConfig.model_validate(c) for c in configs]
    pack = pack or PackReporter([Reporter() for _ in cfgs])
    packing.check_members_share(cfgs, PACK_VARIES)
    lead = cfgs[0]
    check_pack(lead)
    device = pick_device(lead.device)
    if uses_bf16(device, lead.precision):
        raise ValueError("precision: a packed lot_rl trial runs in fp32 (set precision: fp32, or resources.pack: 1)")
    members = list(range(len(cfgs)))
    eval_seeds = [[1_000_000 + 1_000 * c.seed + i for i in range(c.eval_episodes)] for c in cfgs]
    env_class = environments.BATCHED[lead.task]
    obs_shape, n_actions = env_class.observation_shape, env_class.actions
    n_students = lead.num_students if lead.arm == "lot" else 0
    teachers, students_by_member, samplers = [], [], []
    for cfg in cfgs:  # as each twin builds its agents; its actions are drawn from the global generator after that
        torch.manual_seed(cfg.seed)
        teachers.append(build_agent(cfg, obs_shape, n_actions, "teacher").to(device).train())
        students_by_member.append(
            [build_agent(cfg, obs_shape, n_actions, "student", i).to(device).train() for i in range(n_students)]
        )
        state = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
        samplers.append(torch.Generator(device=device).set_state(state))
    layered = environments.env_kind(lead.task) == "mlp"  # MLP agents act on the last dimension only
    teacher = packing.StackedModel(teachers, pick=packing.whole, by_layer=layered)
    students = [
        packing.StackedModel([own[i] for own in students_by_member], pick=packing.whole, by_layer=layered)
        for i in range(n_students)
    ]
    total_updates = lead.total_rollouts

    def optimizer(model: packing.StackedModel, weight_decay: list[float]) -> packing.StackedOptimizer:
        return packing.StackedOptimizer(
            model.trainable(),
            "adam",
            lr=packing.member_column([c.lr for c in cfgs], device, torch.float64),
            weight_decay=packing.member_column(weight_decay, device, torch.float64),
            momentum=packing.member_column([0.0] * len(cfgs), device, torch.float64),
            clip=packing.member_column([c.max_grad_norm for c in cfgs], device),
            lr_factor=pack_schedule(cfgs, total_updates, device),
            eps=lead.adam_eps,
            schedule_per_step=False,
        )

    optimizers = [optimizer(teacher, [0.0] * len(cfgs))]
    optimizers += [optimizer(s, [c.student_weight_decay for c in cfgs]) for s in students]
    generators = [torch.Generator().manual_seed(c.seed) for c in cfgs]
    all_terms = PackTerms.of(cfgs, device)
    counters = {"epoch": 0, "env_steps": 0, "teacher_updates": 0, "teacher_steps": 0, "student_steps": 0}
    counters |= {"train_seconds": 0.0, "update_seconds": 0.0}
    per_member = [{"eval_env_steps": 0, "eval_returns": [], "train_return": float("nan")} for _ in cfgs]
    saved = pack.restore()
    if saved is not None:
        members = saved["active"]
        packing.leave([teacher, *students], optimizers, members)
        packing.restore_stacks(saved["models"], saved["optimizers"], [teacher, *students], optimizers)
        for member, state in zip(members, saved["generators"], strict=True):
            generators[member].set_state(state)
        counters, per_member = dict(saved["counters"]), [dict(m) for m in saved["members"]]
    run = PackRun(members, lead, deque(maxlen=lead.buffer_rollouts), env_class)
    epoch_seed = counters["epoch"] * 100
    run.obs = run.envs.reset([cfgs[m].seed * 10_000 + epoch_seed + i for m in members for i in range(lead.num_envs)])
    models = [teacher, *students]

    for epoch in range(counters["epoch"] + 1, lead.epochs_to_run + 1):
        epoch_returns: dict[int, list[float]] = {m: [] for m in run.members}
        last_stats: dict[int, dict[str, float]] = {}
        epoch_start = time.perf_counter()
        for rollout_index in range(lead.rollouts_in(epoch)):
            if not run.members:
                break
            terms = all_terms.at(run.members)
            samplers_now, generators_now = of_members(samplers, run.members), of_members(generators, run.members)
            rollout, run.obs, finished = collect_pack_rollout(
                teacher, run.envs, run.obs, lead, terms, samplers_now, device
            )
            for member, returns in zip(run.members, finished, strict=True):
                epoch_returns[member] += returns
            update_start = time.perf_counter()
            stats = pack_teacher_update(teacher, students, optimizers, rollout, lead, terms, generators_now, device)
            run.buffer.append(rollout.obs.transpose(0, 1).flatten(1, 2))
            extra = pack_student_passes(
                teacher, students, optimizers[1:], run.buffer, lead, terms, generators_now, device
            )
            for opt in optimizers:
                opt.advance_schedule()
            synchronize(device)
            count_update(counters, lead, stats["updates"], extra, bool(students), update_start)
            columns = {k: v.tolist() for k, v in stats.items() if k != "updates"}
            last_stats = {m: {k: v[p] for k, v in columns.items()} for p, m in enumerate(run.members)}
            # a member whose parameters went NaN fails now, alone (its twin's next rollout refuses NaN logits); one
            # whose last update of the epoch reported a non-finite loss fails as its twin does, at the epoch's end
            broken = ~finite_members(models)
            last_rollout = rollout_index == lead.rollouts_in(epoch) - 1
            for position, member in enumerate(list(run.members)):
                losses_finite = all(math.isfinite(v) for v in last_stats[member].values())
                if broken[position] or (last_rollout and not losses_finite):
                    failure = last_stats.pop(member) | {"updates": stats["updates"]}
                    pack.fail(member, FloatingPointError(f"PPO losses are not finite in epoch {epoch}: {failure}"))
            run.keep([p for p, m in enumerate(run.members) if m not in pack.failed], models, optimizers)
        counters["train_seconds"] += time.perf_counter() - epoch_start
        if not run.members:
            break

        members, terms = run.members, all_terms.at(run.members)
        seeds = of_members(eval_seeds, members)
        teacher_returns, eval_steps = pack_greedy_returns(teacher, run.eval_envs, seeds, device, lead.eval_step_limit)
        student_returns = [pack_greedy_returns(s, run.eval_envs, seeds, device, lead.eval_step_limit) for s in students]
        agreement = kl_student = None
        if students:
            with torch.no_grad():
                t_logits = teacher(run.buffer[-1], value=False).float()
                s_logits = [s(run.buffer[-1], value=False).float() for s in students]
            agreement = torch.stack([(s.argmax(-1) == t_logits.argmax(-1)).float().mean(1) for s in s_logits])
            kl_student = torch.stack([member_kl(t_logits, s, terms.temperature) for s in s_logits])
        results = {}
        for position, member in enumerate(members):
            record = per_member[member]
            record["eval_env_steps"] += int(eval_steps[position])
            record["eval_returns"] = record["eval_returns"] + [float(teacher_returns[position].mean())]
            if epoch_returns[member]:
                record["train_return"] = float(np.mean(epoch_returns[member]))
            returns = record["eval_returns"]
            metrics = epoch_metrics(returns, record["train_return"], len(epoch_returns[member]), last_stats[member])
            metrics |= step_metrics(counters, n_students)
            if students:
                mine = [float(returns[position].mean()) for returns, _ in student_returns]
                record["eval_env_steps"] += sum(int(taken[position]) for _, taken in student_returns)
                if n_students > 1:
                    metrics |= {f"student{i}/eval_return": value for i, value in enumerate(mine)}
                metrics |= {
                    "student/eval_return": float(np.mean(mine)),
                    "agreement/buffer": float(np.mean(agreement[:, position].tolist())),
                    "kl/student": float(np.mean(kl_student[:, position].tolist())),
                }
            metrics["steps/eval_env"] = record["eval_env_steps"]
            if saved is not None:
                metrics["trial/resumed_from_epoch"] = saved["counters"]["epoch"]
            results[member] = record["metrics"] = metrics
        counters["epoch"] = epoch
        stopped = pack.early_stops(epoch, results)
        run.keep([p for p, m in enumerate(members) if m not in stopped], models, optimizers)
        checkpoint = None
        if any(cfgs[m].checkpoint_every for m in results):
            checkpoint = {
                "active": list(run.members),
                "counters": dict(counters),
                "members": [dict(m) for m in per_member],
                "generators": [generators[m].get_state() for m in run.members],
                "models": [{"params": packing.detached(m.params)} for m in models],
                "optimizers": [opt.state_dict() for opt in optimizers],
            }
        pack.report(epoch, results, checkpoint=checkpoint)
    return {m: record["metrics"] for m, record in enumerate(per_member) if "metrics" in record and m not in pack.failed}


class PackRun:
    """What a pack's members step through, by position: their training and evaluation environments, the last
    observation, the students' buffer."""

    def __init__(self, members: list[int], cfg: LoTRLConfig, buffer: deque, env_class: type) -> None:
        self.members, self.cfg, self.buffer, self.env_class = list(members), cfg, buffer, env_class
        self.envs = env_class(len(members) * cfg.num_envs, cfg.step_limit)
        self.eval_envs = env_class(len(members) * cfg.eval_episodes, cfg.step_limit)
        self.obs = np.zeros((0,))

    def keep(
        self, positions: list[int], models: list[packing.StackedModel], optimizers: list[packing.StackedOptimizer]
    ) -> None:
        """Only the members at these positions go on: their envs, observations, buffer and stacked slices."""
        if len(positions) == len(self.members):
            return
        per = self.cfg.num_envs
        envs = np.array([p * per + i for p in positions for i in range(per)], dtype=np.int64)
        self.envs.keep(envs)
        self.obs = self.obs[envs]
        self.buffer = deque([rollouts[positions] for rollouts in self.buffer], maxlen=self.buffer.maxlen)
        self.members = [self.members[p] for p in positions]
        self.eval_envs = self.env_class(len(self.members) * self.cfg.eval_episodes, self.cfg.step_limit)
        packing.leave(models, optimizers, positions)


def finite_members(models: list[packing.StackedModel]) -> torch.Tensor:
    """(P,) whether each member's parameters are all finite."""
    finite = None
    for model in models:
        for tensor in model.params.values():
            mine = torch.isfinite(tensor.detach()).flatten(1).all(1)
            finite = mine if finite is None else finite & mine
    return finite.cpu()


def of_members(items: list, members: list[int]) -> list:
    return [items[m] for m in members]


# A CartPole PPO that learns well above a random policy in 40,960 environment steps (4 epochs of 10,240): the
# smoke check of this job on a device (the tests on the CPU, scripts/gpu_check.py on CUDA).
CARTPOLE_QUICK: dict[str, Any] = {
    "task": "gym:CartPole-v1",
    "num_envs": 4,
    "num_steps": 128,
    "clip_coef": 0.2,
    "lr": 2.5e-3,
    "steps_per_epoch": 10_240,
    "epochs": 4,
}

JOB = JobSpec(
    config=LoTRLConfig,
    train=train,
    metrics=metrics,
    objective=("teacher/eval_return", "max"),
    scores=(
        "teacher/eval_return",
        "teacher/eval_return_auc",
        "teacher/train_return",
        "student/eval_return",
        "agreement/buffer",
    ),
    fixed_arms=fixed_arms,
    baselines=baselines,
    compare=compare,
    uncompared=uncompared,
    selection_split=selection_split,
    default_arm="lot",
    single_process=True,  # vectorised environments in one process; more envs, not DDP workers
    train_pack=train_pack,
    pack_varies=PACK_VARIES,
    check_pack=check_pack,
)
