"""Early stopping of packed members: ASHA's rule, decided for each member of a pack on its own.

Tune's ASHAScheduler stops whole Tune trials, and a pack is one Tune trial holding many Optuna trials, so a pack
decides for its members itself, by the same rule (one bracket, as `scheduler:` configures Tune's): at each
milestone `grace_period * reduction_factor**k` epochs (below `max_t`), a searched member stops when its objective
is worse than the (1 - 1/reduction_factor) quantile of what the sweep's other searched trials recorded at that
milestone. What they recorded is the Optuna study's intermediate values, which every member reports there, so the
rungs are shared by all packs of the sweep, wherever they run."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import optuna

CONTINUE, CUT, END = "continue", "cut", "end"


def milestones(grace_period: int, reduction_factor: float, max_t: int) -> list[float]:
    """The rungs at which ASHA compares trials (Tune's ASHAScheduler with one bracket): grace_period * rf**k."""
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    return [grace_period * reduction_factor**k for k in range(count)]


def stops(value: float, recorded: list[float], mode: str, reduction_factor: float) -> bool:
    """Whether a trial at a milestone stops: its value is worse than the (1 - 1/rf) quantile of the values the
    other trials recorded there (none recorded: it goes on)."""
    if not recorded:
        return False
    sign = 1.0 if mode == "max" else -1.0
    cutoff = np.nanpercentile([sign * v for v in recorded], (1 - 1 / reduction_factor) * 100)
    return bool(sign * value < cutoff)


@dataclass
class StudyASHA:
    """ASHA over the sweep's Optuna study (its RDB storage, on the results directory every node shares)."""

    storage_url: str
    study_name: str
    mode: str
    grace_period: int
    reduction_factor: float
    max_t: int

    @functools.cached_property
    def storage(self) -> optuna.storages.RDBStorage:
        return optuna.storages.RDBStorage(self.storage_url)

    def __getstate__(self) -> dict:  # pickled to trial processes without its open storage
        return {k: v for k, v in self.__dict__.items() if k != "storage"}

    def decide(self, number: int, epoch: int, value: float) -> str:
        """Record the member's objective at `epoch` as an intermediate value of its Optuna trial `number`, and
        what ASHA makes of it: END at `max_t` (Tune ends a trial there as finished), CUT when worse than the
        quantile at a milestone crossed this epoch (a milestone of 1.5 is crossed at epoch 2), else CONTINUE.
        Each trial reports every epoch, so what others recorded at a milestone is their value at that epoch."""
        storage = self.storage
        study_id = storage.get_study_id_from_name(self.study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
        rungs = milestones(self.grace_period, self.reduction_factor, self.max_t)
        crossed = [m for m in rungs if epoch - 1 < m <= epoch]
        decision = END if epoch >= self.max_t else CONTINUE
        if decision == CONTINUE and crossed:
            others = [t for t in storage.get_all_trials(study_id, deepcopy=False) if t.number != number]
            recorded = [t.intermediate_values[epoch] for t in others if epoch in t.intermediate_values]
            if stops(value, recorded, self.mode, self.reduction_factor):
                decision = CUT
        if math.isfinite(value) and storage.get_trial(trial_id).state == optuna.trial.TrialState.RUNNING:
            # (a member re-run after its driver died reports to a trial the resume told FAIL: nothing to record)
            storage.set_trial_intermediate_value(trial_id, epoch, value)
        return decision
