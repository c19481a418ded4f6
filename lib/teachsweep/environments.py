"""Reinforcement-learning tasks: what `gym:`, `minatar:` and `ale:` task names mean, checked before a trial starts,
and the vectorised environments a PPO trial steps. Everything here installs offline from the package registry
(gymnasium's classic control, the `minatar` package, ale-py with its ROMs).

    gym:CartPole-v1      any registered gymnasium id with discrete actions and a flat observation (an MLP policy)
    minatar:breakout     MinAtar's 10x10 games (asterix, breakout, freeway, seaquest, space_invaders; a small CNN)
    ale:Breakout         ALE Atari games with the standard preprocessing (no-op starts, frame skip 4, 84x84 grey,
                         4 stacked frames, FIRE on reset, rewards clipped to their sign in training; the Nature CNN).
                         v5 dynamics: sticky actions with probability 0.25 (Machado et al. 2018).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import gymnasium as gym
import numpy as np

FAMILIES = ("gym", "minatar", "ale")
MINATAR_GAMES = ("asterix", "breakout", "freeway", "seaquest", "space_invaders")
EnvKind = Literal["mlp", "minatar", "atari"]


def split_name(name: str) -> tuple[str, str]:
    family, sep, game = name.partition(":")
    if not sep or family not in FAMILIES or not game:
        raise ValueError(f"task {name!r}: an RL task is gym:<id>, minatar:<game> or ale:<Game> (e.g. gym:CartPole-v1)")
    return family, game


def env_kind(name: str) -> EnvKind:
    family, _ = split_name(name)
    return {"gym": "mlp", "minatar": "minatar", "ale": "atari"}[family]  # type: ignore[return-value]


def _register_ale() -> None:
    import ale_py  # optional: installed for these environments only

    gym.register_envs(ale_py)


def validate_env_name(name: str, check_installed: bool = True) -> str:
    """The task name, or a one-line ValueError saying what is wrong with it. `check_installed=False` (a finished
    sweep read back) looks at the name only: no environment is registered or built, none need be installed."""
    family, game = split_name(name)
    if not check_installed:
        return name
    if family == "minatar":
        if game not in MINATAR_GAMES:
            raise ValueError(f"task {name!r}: MinAtar games are {', '.join(MINATAR_GAMES)}")
        return name
    if family == "ale":
        _register_ale()
        if f"ALE/{game}-v5" not in gym.envs.registry:
            raise ValueError(f"task {name!r}: ale-py has no game {game!r} (names as in ALE/<Game>-v5, e.g. Breakout)")
        return name
    if game not in gym.envs.registry:
        raise ValueError(f"task {name!r}: gymnasium has no environment {game!r}")
    env = gym.make(game)
    try:
        if not isinstance(env.action_space, gym.spaces.Discrete):
            raise ValueError(f"task {name!r}: PPO here needs discrete actions, {game} has {env.action_space}")
        if len(env.observation_space.shape or ()) != 1:
            raise ValueError(f"task {name!r}: a gym: task needs flat observations for its MLP policy")
    finally:
        env.close()
    return name


class FireOnReset(gym.Wrapper):
    """Press FIRE after each reset, for the games that wait for it (Breakout would otherwise idle)."""

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        obs, _, terminated, truncated, info = self.env.step(1)
        if terminated or truncated:
            obs, info = self.env.reset(**kwargs)
        return obs, info


def make_env(name: str, step_limit: int | None = None, clip_rewards: bool = True) -> gym.Env:
    """One environment of the task. Episode statistics record the game's own rewards; in training Atari rewards are
    then clipped to their sign (`clip_rewards`), as PPO on Atari does."""
    family, game = split_name(name)
    if family == "gym":
        env = gym.make(game, max_episode_steps=step_limit)
    elif family == "minatar":
        from minatar.gym import BaseEnv  # optional: installed for these environments only

        env = gym.wrappers.TimeLimit(BaseEnv(game, use_minimal_action_set=True), step_limit or 10_000)
    else:
        _register_ale()
        env = gym.make(f"ALE/{game}-v5", frameskip=1, max_episode_steps=step_limit or 108_000)
        env = gym.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84, grayscale_obs=True)
        if "FIRE" in env.unwrapped.get_action_meanings():
            env = FireOnReset(env)
        env = gym.wrappers.FrameStackObservation(env, 4)
    env = gym.wrappers.RecordEpisodeStatistics(env)
    if family == "ale" and clip_rewards:
        env = gym.wrappers.TransformReward(env, lambda r: float(np.sign(r)))
    return env


def make_vector_env(
    name: str, num_envs: int, step_limit: int | None = None, clip_rewards: bool = True
) -> gym.vector.VectorEnv:
    """`num_envs` copies stepped together in this process. An episode that ends is reset in the same step (its last
    observation is in info["final_obs"], its return in info["final_info"]["episode"]), so a rollout never holds a
    step whose action was ignored."""
    factories: list[Callable[[], gym.Env]] = [lambda: make_env(name, step_limit, clip_rewards) for _ in range(num_envs)]
    return gym.vector.SyncVectorEnv(factories, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def finished_episodes(info: dict) -> tuple[np.ndarray, np.ndarray]:
    """(mask of the envs whose episode ended in this step, their episodic returns) from a vector step's info."""
    final = info.get("final_info", {})
    mask = np.asarray(final.get("_episode", np.zeros(0, dtype=bool)), dtype=bool)
    if not mask.any():
        return mask, np.zeros(0)
    return mask, np.asarray(final["episode"]["r"], dtype=np.float64)[mask]


class BatchedEnvs:
    """`n` copies of one classic-control environment as arrays, stepped with numpy in one call: its dynamics, time
    limit, episode returns and same-step resets as `make_vector_env(task, n)` gives them, number for number (each
    env keeps its own generator, seeded as gymnasium seeds it, for the draws of its resets). What packs of RL
    trials step. Subclasses give the state's start, the dynamics and the observation."""

    observation_shape: tuple[int, ...]
    actions: int
    default_step_limit: int

    def __init__(self, n: int, step_limit: int | None = None) -> None:
        self.n, self.step_limit = n, step_limit or self.default_step_limit
        self.state = np.zeros((n, 4))
        self.elapsed = np.zeros(n, dtype=np.int64)
        self.returns = np.zeros(n)
        self.generators: list[np.random.Generator] = []

    def start(self, generator: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def dynamics(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(next state, rewards, terminated) of every env."""
        raise NotImplementedError

    def observe(self, state: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def observe_start(self, state: np.ndarray) -> np.ndarray:
        """The observation of a state just drawn by `start` (an environment may compute it differently)."""
        return self.observe(state)

    def reset(self, seeds: list[int]) -> np.ndarray:
        self.generators = [gym.utils.seeding.np_random(seed)[0] for seed in seeds]
        self.state = np.stack([self.start(g) for g in self.generators])
        self.elapsed[:], self.returns[:] = 0, 0.0
        return self.observe_start(self.state)

    def keep(self, envs: np.ndarray) -> None:
        """Only these envs go on (a pack whose members left), each as it was."""
        self.state, self.elapsed, self.returns = self.state[envs], self.elapsed[envs], self.returns[envs]
        self.generators = [self.generators[i] for i in envs]
        self.n = len(envs)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, ...]:
        """(observations, rewards, terminated, truncated, final observations, episode returns): the last two hold
        the ended envs' last observation and return (NaN elsewhere); an ended env is already reset in the first."""
        self.state, rewards, terminated = self.dynamics(actions)
        self.elapsed += 1
        self.returns += rewards
        truncated = self.elapsed >= self.step_limit
        ended = terminated | truncated
        observations = self.observe(self.state)
        final = np.full_like(observations, np.nan)
        returns = np.full(self.n, np.nan)
        for i in np.flatnonzero(ended):
            final[i], returns[i] = observations[i], self.returns[i]
            self.state[i] = self.start(self.generators[i])
            observations[i] = self.observe_start(self.state[i : i + 1])[0]
            self.elapsed[i], self.returns[i] = 0, 0.0
        return observations, rewards, terminated, truncated, final, returns


class BatchedCartPole(BatchedEnvs):
    """CartPole-v1 (gymnasium's `CartPoleEnv`, Euler integration) as arrays."""

    gravity, masspole, total_mass, length, force_mag, tau = 9.8, 0.1, 1.1, 0.5, 10.0, 0.02
    polemass_length = 0.05
    theta_threshold, x_threshold = 12 * 2 * math.pi / 360, 2.4
    observation_shape, actions, default_step_limit = (4,), 2, 500

    def start(self, generator: np.random.Generator) -> np.ndarray:
        return generator.uniform(low=-0.05, high=0.05, size=(4,))

    def observe(self, state: np.ndarray) -> np.ndarray:
        return state.astype(np.float32)

    def dynamics(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x, x_dot, theta, theta_dot = self.state.T
        force = np.where(actions == 1, self.force_mag, -self.force_mag)
        costheta, sintheta = np.cos(theta), np.sin(theta)
        temp = (force + self.polemass_length * np.square(theta_dot) * sintheta) / self.total_mass
        thetaacc = (self.gravity * sintheta - costheta * temp) / (
            self.length * (4.0 / 3.0 - self.masspole * np.square(costheta) / self.total_mass)
        )
        xacc = temp - self.polemass_length * thetaacc * costheta / self.total_mass
        x, x_dot = x + self.tau * x_dot, x_dot + self.tau * xacc
        theta, theta_dot = theta + self.tau * theta_dot, theta_dot + self.tau * thetaacc
        terminated = (x < -self.x_threshold) | (x > self.x_threshold)
        terminated |= (theta < -self.theta_threshold) | (theta > self.theta_threshold)
        return np.stack([x, x_dot, theta, theta_dot], axis=1), np.ones(self.n), terminated


class BatchedAcrobot(BatchedEnvs):
    """Acrobot-v1 (gymnasium's `AcrobotEnv`, the book's dynamics, one RK4 step of 0.2 s) as arrays."""

    dt, max_vel_1, max_vel_2 = 0.2, 4 * math.pi, 9 * math.pi
    torques = np.array([-1.0, 0.0, 1.0])
    observation_shape, actions, default_step_limit = (6,), 3, 500

    def start(self, generator: np.random.Generator) -> np.ndarray:
        return generator.uniform(low=-0.1, high=0.1, size=(4,)).astype(np.float32).astype(np.float64)

    def observe(self, state: np.ndarray) -> np.ndarray:
        s0, s1, s2, s3 = state.T
        return np.stack([np.cos(s0), np.sin(s0), np.cos(s1), np.sin(s1), s2, s3], axis=1).astype(np.float32)

    def observe_start(self, state: np.ndarray) -> np.ndarray:
        """gymnasium keeps a fresh state in float32, so its first observation's cosines are float32 ones."""
        rows = []
        for row in state.astype(np.float32):
            s0, s1, s2, s3 = row  # numpy float32 scalars, as gymnasium's `_get_ob` indexes them
            rows.append(np.array([np.cos(s0), np.sin(s0), np.cos(s1), np.sin(s1), s2, s3], dtype=np.float32))
        return np.stack(rows)

    @staticmethod
    def derivatives(y: np.ndarray) -> np.ndarray:
        """The book's equations of motion for y = (theta1, theta2, dtheta1, dtheta2, torque), one column per env."""
        m1 = m2 = l1 = i1 = i2 = 1.0
        lc1 = lc2 = 0.5
        g = 9.8
        theta1, theta2, dtheta1, dtheta2, a = y
        d1 = m1 * lc1**2 + m2 * (l1**2 + lc2**2 + 2 * l1 * lc2 * np.cos(theta2)) + i1 + i2
        d2 = m2 * (lc2**2 + l1 * lc2 * np.cos(theta2)) + i2
        phi2 = m2 * lc2 * g * np.cos(theta1 + theta2 - math.pi / 2.0)
        phi1 = (
            -m2 * l1 * lc2 * squared(dtheta2) * np.sin(theta2)
            - 2 * m2 * l1 * lc2 * dtheta2 * dtheta1 * np.sin(theta2)
            + (m1 * lc1 + m2 * l1) * g * np.cos(theta1 - math.pi / 2)
            + phi2
        )
        ddtheta2 = (a + d2 / d1 * phi1 - m2 * l1 * lc2 * squared(dtheta1) * np.sin(theta2) - phi2) / (
            m2 * lc2**2 + i2 - squared(d2) / d1
        )
        ddtheta1 = -(d2 * ddtheta2 + phi1) / d1
        return np.stack([dtheta1, dtheta2, ddtheta1, ddtheta2, np.zeros_like(a)])

    def dynamics(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        y0 = np.concatenate([self.state.T, self.torques[actions][None]])  # (5, envs)
        dt, dt2 = self.dt, self.dt / 2.0
        k1 = self.derivatives(y0)
        k2 = self.derivatives(y0 + dt2 * k1)
        k3 = self.derivatives(y0 + dt2 * k2)
        k4 = self.derivatives(y0 + dt * k3)
        state = (y0 + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4))[:4]
        for row in (0, 1):  # wrapped into [-pi, pi] as gymnasium's `wrap` does, one period at a time
            while (state[row] > math.pi).any() or (state[row] < -math.pi).any():
                state[row] = np.where(state[row] > math.pi, state[row] - 2 * math.pi, state[row])
                state[row] = np.where(state[row] < -math.pi, state[row] + 2 * math.pi, state[row])
        state[2] = np.minimum(np.maximum(state[2], -self.max_vel_1), self.max_vel_1)
        state[3] = np.minimum(np.maximum(state[3], -self.max_vel_2), self.max_vel_2)
        terminated = -np.cos(state[0]) - np.cos(state[1] + state[0]) > 1.0
        return state.T.copy(), np.where(terminated, 0.0, -1.0), terminated


def squared(x: np.ndarray) -> np.ndarray:
    """x**2 as C's pow() gives it, element by element: gymnasium squares numpy scalars, which calls pow(), and an
    array's `**2` is an exact multiplication that differs from it in the last bit now and then (Acrobot is
    chaotic: one bit becomes another trajectory)."""
    return np.fromiter((math.pow(v, 2.0) for v in x.tolist()), dtype=np.float64, count=len(x))


BATCHED = {"gym:CartPole-v1": BatchedCartPole, "gym:Acrobot-v1": BatchedAcrobot}
