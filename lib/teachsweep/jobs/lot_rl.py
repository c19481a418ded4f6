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
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator
from torch import nn

from teachsweep import environments, models
from teachsweep.jobs import ArmPlan, JobSpec, lot
from teachsweep.jobs.lot import LoTTermConfig, kl_divergence
from teachsweep.reporter import Reporter
from teachsweep.training import autocast, checks_files, pick_device, restore_into, state_of, synchronize, uses_bf16

# ---------------------------------------------------------------------------------------------- config


class LoTRLConfig(LoTTermConfig):
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
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"

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

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, value) from one observation batch."""
        x = self.prepare(obs)
        features = self.actor_body(x)
        critic_features = features if self.critic_body is None else self.critic_body(x)
        return self.actor_head(features), self.critic_head(critic_features).squeeze(-1)


def build_agent(cfg: LoTRLConfig, obs_shape, n_actions: int, role: str, index: int = 0) -> Agent:
    torch.manual_seed(models.init_seed(cfg.seed, role, index))
    return Agent(environments.env_kind(cfg.task), obs_shape, n_actions, cfg.hidden, critic=role == "teacher")


# ---------------------------------------------------------------------------------------------- losses


def gae(
    rewards: torch.Tensor, values: torch.Tensor, ended: torch.Tensor, last_value: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and value targets over a rollout of shape (steps, envs).

    ended[t] = 1 when the transition at step t ended its episode (the observation after it starts a new one);
    last_value = V(observation after the rollout)."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(last_value)
    for t in reversed(range(rewards.size(0))):
        next_value = last_value if t == rewards.size(0) - 1 else values[t + 1]
        not_ended = 1.0 - ended[t]
        delta = rewards[t] + gamma * next_value * not_ended - values[t]
        running = delta + gamma * lam * not_ended * running
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
    steps = 0
    for _ in range(cfg.student_steps):
        order = torch.randperm(len(observations), generator=generator).to(device)
        for index in order.split(batch):
            obs = observations[index]
            with autocast(device, precision):
                with torch.no_grad():
                    target = teacher.logits(obs)
                for student, (optimizer, _) in zip(students, optimizers, strict=True):
                    student_imitation_loss(student.logits(obs).float(), target.float(), cfg.temperature).backward()
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
            counters["update_seconds"] += time.perf_counter() - update_start
            counters["env_steps"] += cfg.rollout_size
            counters["teacher_updates"] += 1
            counters["teacher_steps"] += stats["updates"]
            counters["student_steps"] += (stats["updates"] if cfg.joint_student_step and students else 0) + extra
        counters["train_seconds"] += time.perf_counter() - epoch_start
        if not all(math.isfinite(v) for v in stats.values()):
            raise FloatingPointError(f"PPO losses are not finite in epoch {epoch}: {stats}")

        teacher_returns, eval_steps = greedy_returns(teacher, eval_envs, eval_seeds, device, cfg.eval_step_limit)
        counters["eval_env_steps"] += eval_steps
        counters["eval_returns"] = counters["eval_returns"] + [float(teacher_returns.mean())]
        if epoch_returns:
            counters["train_return"] = float(np.mean(epoch_returns))
        metrics = {
            "teacher/eval_return": float(teacher_returns.mean()),
            "teacher/eval_return_auc": float(np.mean(counters["eval_returns"])),
            "teacher/best_eval_return": float(np.max(counters["eval_returns"])),
            "teacher/train_return": counters["train_return"],
            "teacher/train_episodes": len(epoch_returns),
            **{k: v for k, v in stats.items() if k != "updates"},
            "steps/env": counters["env_steps"],
            "steps/teacher_updates": counters["teacher_updates"],
            "steps/teacher": counters["teacher_steps"],
            "steps/student": counters["student_steps"],
            "steps/model": counters["teacher_steps"] + counters["student_steps"] * n_students,
            "time/env_steps_per_s": counters["env_steps"] / counters["train_seconds"],
            "time/teacher_update_s": counters["update_seconds"] / counters["teacher_updates"],
            "time/train_s": counters["train_seconds"],
        }
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
)
