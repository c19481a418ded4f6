"""Search: which trial Tune starts next. The fixed trials (plan.py) come first, then Optuna's suggestions.

The search state lives in the sweep's Optuna RDB study and is read and written through Optuna's public API only
(`ask`, `tell`, `add_trial`, `get_trials`): a driver that dies and is resumed finds the study as it was, marks
the trials that were running then as failed, and tells their re-runs as new trials. Tune checkpoints only the
map from its trial ids to Optuna trial numbers."""

from __future__ import annotations

import pickle
import warnings
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from ray.tune.search import Searcher

from teachsweep.plan import (
    OPTUNA_TRIAL,
    PACK,
    member_id,
    member_states,
    packs_of,
    searched_packs,
    structural_params,
)
from teachsweep.spec import SweepSpec

TUNE_TRIAL = "tune_trial_id"  # the Optuna trial's user attribute naming its Tune trial (or pack member)


def optuna_space(spec: SweepSpec) -> dict[str, Any]:
    space = {}
    for key, p in spec.space.items():
        if p.type == "categorical":
            space[key] = CategoricalDistribution(p.values)
        elif p.type == "int":
            space[key] = IntDistribution(int(p.low), int(p.high), log=p.log)
        else:
            space[key] = FloatDistribution(p.low, p.high, log=p.type == "loguniform")
    return space


def make_sampler(spec: SweepSpec, seed: int) -> optuna.samplers.BaseSampler:
    if spec.sampler.type == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def open_study(spec: SweepSpec, storage_url: str) -> optuna.Study:
    """The sweep's study (created on first use), named after the sweep, with its metric names recorded.

    A resumed study's sampler is seeded from the spec's seed and the trials the study already holds: seeded as at
    the start, its random start-up draws would replay the configurations the study already tried."""
    directions = ["maximize" if mode == "max" else "minimize" for mode in spec.mode_names]
    study = optuna.create_study(
        study_name=spec.name,
        storage=optuna.storages.RDBStorage(storage_url),
        sampler=make_sampler(spec, spec.sampler.seed),
        directions=directions,
        load_if_exists=True,
    )
    if held := len(study.get_trials(deepcopy=False)):
        study.sampler = make_sampler(spec, (spec.sampler.seed + 1_000_003 * held) % 2**32)
    if study.metric_names is None:  # what optuna-dashboard labels the objectives with
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(spec.metric_names)
    return study


class StudySearcher(Searcher):
    """Optuna's suggestions through ask/tell on the sweep's study."""

    def __init__(self, spec: SweepSpec, storage_url: str):
        super().__init__(metric=spec.metric_names[0], mode=spec.mode_names[0])
        self.spec, self.storage_url = spec, storage_url
        self.space = optuna_space(spec)
        self.numbers: dict[str, int] = {}  # Tune trial id -> Optuna trial number
        self.asked: dict[str, optuna.Trial] = {}  # trials asked by this driver (for intermediate values)
        self._study: optuna.Study | None = None

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            self._study = open_study(self.spec, self.storage_url)
        return self._study

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | str:
        if not self.spec.packed:
            return dict(self.ask(trial_id).params)
        sizes = searched_packs(self.spec)
        packs_asked = len({key.rsplit(".", 1)[0] for key in self.numbers if "." in key})
        if packs_asked >= len(sizes):
            return Searcher.FINISHED
        leader = self.ask(member_id(trial_id, 0))
        shared = {key: leader.params[key] for key in structural_params(self.spec)}
        members = [leader]
        base = self.study.sampler
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # the other members sample what they may differ in, the leader's structure fixed
            self.study.sampler = optuna.samplers.PartialFixedSampler(shared, base)
        try:
            for index in range(1, sizes[packs_asked]):
                members.append(self.ask(member_id(trial_id, index)))
        finally:
            self.study.sampler = base
        return {PACK: [dict(member.params) | {OPTUNA_TRIAL: member.number} for member in members]}

    def ask(self, key: str) -> optuna.Trial:
        trial = self.study.ask(self.space)
        trial.set_user_attr(TUNE_TRIAL, key)  # read back on resume (complete_finished_trials)
        self.numbers[key], self.asked[key] = trial.number, trial
        return trial

    def frozen(self, trial_id: str) -> optuna.trial.FrozenTrial | None:
        number = self.numbers.get(trial_id)
        if number is None:
            return None
        return next((t for t in self.study.get_trials(deepcopy=False) if t.number == number), None)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Intermediate values of a single objective, by epoch (what Optuna's own pruners and plots read)."""
        trial, metric = self.asked.get(trial_id), self.spec.metric_names[0]
        if trial is None or len(self.spec.metric_names) > 1 or metric not in result:
            return
        frozen = self.frozen(trial_id)
        if frozen is not None and frozen.state == TrialState.RUNNING:
            trial.report(float(result[metric]), step=int(result.get("training_iteration", 0)))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        members = [key for key in self.numbers if key.startswith(f"{trial_id}.")]
        if not members:
            self.tell(trial_id, result, error)
            return
        states = member_states(result)
        for key in members:
            state = states.get(key, {})
            # a member ASHA stopped is told its last objective, as Tune tells a trial its scheduler stopped
            self.tell(key, state, error or state.get("status") not in ("OK", "STOPPED"))

    def tell(self, key: str, result: dict | None, error: bool) -> None:
        """Tell the study one trial's (or member's) end: its objectives, a failure, or early stopping."""
        frozen = self.frozen(key)
        if frozen is None:
            return
        values = [result.get(m) for m in self.spec.metric_names] if result else None
        complete = not error and values is not None and all(v is not None for v in values)
        if frozen.state.is_finished():
            # A trial re-run after a resume: its Optuna trial was failed then; a result that already reached
            # the study before the driver died is not told twice.
            if complete and frozen.state == TrialState.FAIL:
                self.study.add_trial(
                    optuna.trial.create_trial(
                        params=frozen.params, distributions=frozen.distributions, values=[float(v) for v in values]
                    )
                )
            return
        if complete:
            self.study.tell(frozen.number, [float(v) for v in values])
        else:  # a trial stopped before reporting its objective (an error, or early stopping)
            self.study.tell(frozen.number, state=TrialState.FAIL if error else TrialState.PRUNED)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"numbers": self.numbers}, f)

    def restore(self, checkpoint_path: str) -> None:
        """The map Tune trial -> Optuna trial; each Optuna trial also names its Tune trial, so a searcher file cut
        short by a killed driver costs nothing."""
        try:
            with open(checkpoint_path, "rb") as f:
                self.numbers = pickle.load(f)["numbers"]
        except (OSError, EOFError, KeyError, pickle.UnpicklingError):
            trials = self.study.get_trials(deepcopy=False)
            self.numbers = {t.user_attrs[TUNE_TRIAL]: t.number for t in trials if TUNE_TRIAL in t.user_attrs}


class NothingToSearch(Searcher):
    """The searcher of a grid: Tune's restore insists on finding a searcher file, so it writes an empty one."""

    def suggest(self, trial_id: str):
        return Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            f.write(b"")

    def restore(self, checkpoint_path: str) -> None:
        pass


class FixedThenSearch(Searcher):
    """Hands out the fixed trials first, then the searcher's suggestions. Fixed trials are never told to the
    study, so it holds searched trials only, while all trials share one Tune experiment (and the machine)."""

    def __init__(self, fixed: list[dict[str, Any]], searcher: Searcher, metric: str, mode: str):
        super().__init__(metric=metric, mode=mode)
        self.pending, self.fixed_ids, self.searcher = list(fixed), set(), searcher

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str):
        if self.pending:
            self.fixed_ids.add(trial_id)
            entry = self.pending.pop(0)
            # (a searcher saved by an earlier version holds the fixed trials themselves)
            return entry if "fixed_trial" in entry or PACK in entry else {"fixed_trial": entry}
        return self.searcher.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self.fixed_ids:
            self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        if trial_id not in self.fixed_ids:
            self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def get_state(self) -> dict:
        return {"pending": list(self.pending), "fixed_ids": set(self.fixed_ids)}

    def set_state(self, state: dict) -> None:
        self.pending, self.fixed_ids = state["pending"], state["fixed_ids"]

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)


def make_searcher(spec: SweepSpec, storage_url: str, planned: list[dict[str, Any]]) -> tuple[FixedThenSearch, int]:
    """The sweep's searcher over its `planned` fixed trials (plan.fixed_trials), and how many Tune trials it will
    hand out (a pack is one Tune trial)."""
    fixed: list[dict[str, Any]] = [{"fixed_trial": trial} for trial in planned]
    if spec.packed:
        fixed = [{PACK: [{"fixed_trial": trial} for trial in pack]} for pack in packs_of(spec, planned)]
    metric, mode = spec.metric_names[0], spec.mode_names[0]
    searcher = StudySearcher(spec, storage_url) if spec.space else NothingToSearch(metric=metric, mode=mode)
    searched = len(searched_packs(spec)) if spec.packed else spec.num_samples if spec.space else 0
    return FixedThenSearch(fixed, searcher, metric, mode), len(fixed) + searched


def complete_finished_trials(spec: SweepSpec, storage_url: str, failed: list[int], results) -> int:
    """Trials Tune recorded as finished (their last result `done`) whose Optuna trial the dead driver had not told
    yet (one of `failed`, just told FAIL): Tune will not run them again, so their results reach the study now, as
    new trials (as a re-run's would). Without this a driver killed between the two writes lost a result."""
    if not failed:
        return 0
    study = optuna.load_study(study_name=spec.name, storage=optuna.storages.RDBStorage(storage_url))
    by_tune_id = {t.user_attrs.get(TUNE_TRIAL): t for t in study.get_trials(deepcopy=False) if t.number in failed}
    told = 0
    for result in results:
        metrics = result.metrics or {}
        if result.error is not None or not metrics.get("done"):
            continue
        ended = [(metrics.get("trial_id"), metrics)]
        if member_states(metrics):  # a pack's members, each its own Optuna trial
            ended = [(key, state) for key, state in member_states(metrics).items() if state.get("status") == "OK"]
        for key, values_of in ended:
            trial = by_tune_id.get(key)
            values = [values_of.get(m) for m in spec.metric_names]
            if trial is None or None in values:
                continue
            study.add_trial(
                optuna.trial.create_trial(
                    params=trial.params, distributions=trial.distributions, values=[float(v) for v in values]
                )
            )
            told += 1
    return told


def fail_interrupted_trials(spec: SweepSpec, storage_url: str) -> list[int]:
    """Optuna trials left RUNNING by a driver that died are told FAIL; Tune re-runs their trials, and their
    results come back to the study as new trials (StudySearcher.on_trial_complete)."""
    try:
        study = optuna.load_study(study_name=spec.name, storage=optuna.storages.RDBStorage(storage_url))
    except KeyError:
        return []
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in running:
        study.tell(trial.number, state=TrialState.FAIL)
    return [t.number for t in running]


def requeue_lost_trials(spec: SweepSpec, storage_url: str, failed: list[int], recorded: set[str]) -> int:
    """Trials the dead driver had asked (and the resume told FAIL) whose Tune trial the restored experiment never
    recorded: Tune will not run them again, so their configurations are enqueued, and the next asks run them."""
    if not failed or spec.packed:  # (a pack's members must share their structure: they are asked, not queued)
        return 0
    study = optuna.load_study(study_name=spec.name, storage=optuna.storages.RDBStorage(storage_url))
    lost = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.number in failed
        and t.params  # a driver killed inside `ask` leaves a trial with no configuration: nothing to bring back
        and str(t.user_attrs.get(TUNE_TRIAL, "")).split(".")[0] not in recorded
    ]
    for trial in lost:
        study.enqueue_trial(trial.params, skip_if_exists=False)
    return len(lost)
