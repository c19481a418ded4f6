"""`teachsweep bench rl`: lot_rl's teacher-only PPO against a minimal reference PPO loop, and LoT's time per
teacher update against teacher-only beside the FLOP ideal."""

from __future__ import annotations

import statistics
import time

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from teachsweep import environments
from teachsweep.benchmarks.measure import peak_memory
from teachsweep.jobs import lot_rl

RL_BENCH_JOB = {
    "num_envs": 8,
    "num_steps": 128,
    "num_minibatches": 4,
    "update_epochs": 4,
    "buffer_rollouts": 10,
    "alpha": 0.5,
    "student_steps": 5,
    "temperature": 1.0,
    "epochs": 1,
    "eval_episodes": 1,
    "eval_step_limit": 1,
    "device": "cpu",
    "checkpoint_every": 0,
}


def reference_ppo_steps_per_s(config: dict, rollouts: int) -> float:
    """Environment steps per second of a minimal CleanRL-style PPO loop (sample, step, GAE, clipped policy and value
    losses, the approximate KL it logs; nothing else), with lot_rl's network and vectorised envs: the yardstick for
    the job's own teacher-only loop."""
    cfg = lot_rl.LoTRLConfig.model_validate(config)
    envs = environments.make_vector_env(cfg.task, cfg.num_envs)
    device = torch.device(
        "cuda" if cfg.device == "auto" and torch.cuda.is_available() else "cpu" if cfg.device == "auto" else cfg.device
    )
    agent = lot_rl.build_agent(cfg, envs.single_observation_space.shape, int(envs.single_action_space.n), "teacher")
    agent = agent.to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
    obs, _ = envs.reset(seed=list(range(cfg.num_envs)))
    start = time.perf_counter()
    for _ in range(rollouts):
        stored = []
        with torch.no_grad():
            for _ in range(cfg.num_steps):
                obs_t = torch.as_tensor(obs, device=device)
                logits, value = agent(obs_t)
                dist = torch.distributions.Categorical(logits=logits)
                action = dist.sample()
                obs, reward, terminated, truncated, _ = envs.step(action.cpu().numpy())
                stored.append(
                    (
                        obs_t,
                        action,
                        dist.log_prob(action),
                        value,
                        torch.as_tensor(reward, device=device).float(),
                        torch.as_tensor(terminated | truncated, device=device).float(),
                    )
                )
            last_value = agent(torch.as_tensor(obs, device=device))[1]
        b_obs, b_act, b_logp, b_val, b_rew, b_done = (torch.stack(c) for c in zip(*stored, strict=True))
        advantages, running = torch.zeros_like(b_rew), torch.zeros(cfg.num_envs, device=device)
        for t in reversed(range(cfg.num_steps)):
            next_value = last_value if t == cfg.num_steps - 1 else b_val[t + 1]
            delta = b_rew[t] + cfg.gamma * next_value * (1 - b_done[t]) - b_val[t]
            running = advantages[t] = delta + cfg.gamma * cfg.gae_lambda * (1 - b_done[t]) * running
        returns = (advantages + b_val).flatten()
        b_obs, b_act, b_logp, advantages = b_obs.flatten(0, 1), b_act.flatten(), b_logp.flatten(), advantages.flatten()
        kls = []
        for _ in range(cfg.update_epochs):
            for index in torch.randperm(cfg.rollout_size, device=device).split(cfg.minibatch_size):
                logits, value = agent(b_obs[index])
                dist = torch.distributions.Categorical(logits=logits)
                log_ratio = dist.log_prob(b_act[index]) - b_logp[index]
                ratio = log_ratio.exp()
                adv = (advantages[index] - advantages[index].mean()) / (advantages[index].std() + 1e-8)
                policy = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef)).mean()
                old_value = b_val.flatten()[index]  # clipped value loss, as CleanRL's default
                clipped = old_value + (value - old_value).clamp(-cfg.clip_coef, cfg.clip_coef)
                v_loss = 0.5 * torch.max((value - returns[index]) ** 2, (clipped - returns[index]) ** 2).mean()
                loss = policy + cfg.vf_coef * v_loss - cfg.ent_coef * dist.entropy().mean()
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
                optimizer.step()
                with torch.no_grad():
                    kls.append((ratio - 1 - log_ratio).mean())  # approx KL, logged by CleanRL-style loops
        float(torch.stack(kls).mean())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    envs.close()
    return rollouts * cfg.rollout_size / elapsed


def rl_forward_flops(cfg: lot_rl.LoTRLConfig) -> tuple[float, float]:
    """FLOPs of one minibatch forward of the teacher (policy + value) and of a policy network (a student, or the
    teacher's logits alone)."""
    envs = environments.make_vector_env(cfg.task, 1)
    shape, actions = envs.single_observation_space.shape, int(envs.single_action_space.n)
    envs.close()
    teacher = lot_rl.build_agent(cfg, shape, actions, "teacher")
    obs = torch.zeros(cfg.minibatch_size, *shape)
    counts = []
    for forward in (teacher, teacher.logits):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            forward(obs)
        counts.append(float(counter.get_total_flops()))
    return counts[0], counts[1]


def rl_cost(rollouts: int, repeats: int, task: str, console: Console, device: str = "cpu") -> None:
    """(1) Environment steps per second of lot_rl's teacher-only PPO against a minimal PPO loop, same network and
    envs; (2) LoT's time per teacher update against teacher-only, beside the FLOP ideal of what the run did
    (docs/benchmarks.md, the FLOP ideal: a teacher minibatch = 3 units, LoT's joint minibatch = 6, each extra
    student minibatch = 4)."""
    job = RL_BENCH_JOB | {"task": task, "device": device}
    cfg = lot_rl.LoTRLConfig.model_validate(job)
    job["steps_per_epoch"] = rollouts * cfg.rollout_size
    lot_rl.train(job | {"steps_per_epoch": cfg.rollout_size})  # warm-up
    runs: dict[str, list] = {"reference": [], "teacher_only": [], "lot": []}
    for _ in range(repeats):  # interleaved, so that drift in machine speed hits every arm alike
        runs["reference"].append(reference_ppo_steps_per_s(job, rollouts))
        runs["teacher_only"].append(lot_rl.train(job | {"arm": "teacher_only"}))
        runs["lot"].append(lot_rl.train(job | {"arm": "lot"}))
    reference = statistics.median(runs["reference"])
    job_rate = statistics.median(m["time/env_steps_per_s"] for m in runs["teacher_only"])
    title = (
        f"bench rl: {task}, {cfg.num_envs} envs x {cfg.num_steps} steps, {rollouts} rollouts x {repeats} "
        f"repeats (medians), device {device}"
    )
    speed = Table(title=title)
    for column in ("loop", "env steps / s", "ratio to reference"):
        speed.add_column(column)
    speed.add_row("minimal reference PPO", f"{reference:.0f}", "1.00")
    speed.add_row("lot_rl arm=teacher_only", f"{job_rate:.0f}", f"{reference / job_rate:.2f} (time ratio)")
    console.print(speed)

    base = statistics.median(m["time/teacher_update_s"] for m in runs["teacher_only"])
    lot = runs["lot"][0]
    update = statistics.median(m["time/teacher_update_s"] for m in runs["lot"])
    teacher_minibatches = lot["steps/teacher"] / lot["steps/teacher_updates"]
    extra = (lot["steps/student"] - lot["steps/teacher"]) / lot["steps/teacher_updates"]  # beyond the joint steps
    # the units of docs/benchmarks.md weighted by each forward's FLOPs: the students and the teacher's target
    # forward are policy networks without the teacher's value head (for an MLP agent, about half the teacher)
    teacher_fwd, policy_fwd = rl_forward_flops(cfg)
    ideal = (teacher_minibatches * (3 * teacher_fwd + 3 * policy_fwd) + extra * 4 * policy_fwd) / (
        teacher_minibatches * 3 * teacher_fwd
    )
    cost = Table(title=f"LoT (N={cfg.student_steps}, buffer {cfg.buffer_rollouts} rollouts) per teacher update")
    for column in ("arm", "s / teacher update", "ratio to teacher-only", "FLOP ideal", "ratio / ideal"):
        cost.add_column(column)
    cost.add_row("teacher_only", f"{base:.4f}", "1.00", "1.00", "1.00")
    cost.add_row("lot", f"{update:.4f}", f"{update / base:.2f}", f"{ideal:.2f}", f"{update / base / ideal:.2f}")
    cost.caption = (
        f"per update: {teacher_minibatches:.0f} teacher minibatches, {extra:.1f} extra student "
        "minibatches on average (the buffer fills over the first updates)"
    )
    console.print(cost)
    console.print(peak_memory())
