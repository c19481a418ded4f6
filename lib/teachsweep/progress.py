"""Console progress for a running sweep: one line per epoch report, and per finished or failed trial the trials
done of those planned, the failed ones, the elapsed time, an estimate of the time left and the best so far."""

from __future__ import annotations

import time

from ray.tune import Callback
from rich.console import Console

from teachsweep.jobs import JOBS
from teachsweep.layout import SweepDir
from teachsweep.metrics import duration
from teachsweep.plan import OPTUNA_TRIAL, PACK, member_id, member_states, planned_count
from teachsweep.ranking import is_baseline, pick_best
from teachsweep.spec import SweepSpec
from teachsweep.teacher_refs import TeacherReferenceError
from teachsweep.trial import trial_label


def eta(elapsed: float, ended: int, planned: int | None) -> str:
    """The time left if the remaining trials take as long as the ended ones did on average (trials that ran at
    the same time share that time, so this is what the sweep's pace predicts, not one trial's length)."""
    if planned is None or ended == 0:
        return "ETA unknown"
    left = max(0, planned - ended)
    return "ETA 0 s" if left == 0 else f"ETA {duration(elapsed / ended * left)}"


class Progress(Callback):
    """What a resumed sweep prints counts the trials it found finished, but its pace (the ETA) only from the trials
    this driver ended; the best so far is the verdict's rule (baseline arms only when every trial is one)."""

    def __init__(self, spec: SweepSpec):
        self.spec, self.job = spec, JOBS[spec.job]
        self.metrics = spec.metric_names
        self.objective, self.mode = spec.metric_names[0], spec.mode_names[0]
        self._planned: int | None = None
        self.start = time.time()
        self.values: dict[str, tuple[float, bool]] = {}  # trial id -> (objective, is a baseline arm)
        self.ended_before: int | None = None  # trials already ended when this driver started (a resume)

    @property
    def planned(self) -> int | None:
        """The trials the sweep plans: as its run recorded them (run_sweep writes the count before Tune starts),
        else planned here from the spec; None when its teacher sweep is gone and the size cannot be known."""
        if self._planned is None:
            recorded = SweepDir.of(self.spec.name, self.spec.results_dir).planned
            try:
                self._planned = int(recorded.read_text()) if recorded.is_file() else planned_count(self.spec)
            except (ValueError, OSError, TeacherReferenceError):
                return None
        return self._planned

    @staticmethod
    def _print(text: str) -> None:
        Console(highlight=False).print(text)  # made each time: Tune pickles its callbacks, a Console holds a lock

    def _line(self, trial, text: str) -> None:
        if PACK in trial.config:
            label = f"pack of {len(trial.config[PACK])}"
        else:
            label = trial.config.get("fixed_trial", {}).get("label", "search")
        self._print(f"[dim]{time.time() - self.start:6.0f}s[/] {trial.trial_id} {label:<16} {text}")

    def _note_best(self, trial) -> None:
        result = trial.last_result or {}
        if PACK in trial.config:  # each member its own trial
            states = member_states(result)
            for index, member in enumerate(trial.config[PACK]):
                key = member_id(trial.trial_id, index)
                self._note_value(key, member, states.get(key, {}).get(self.objective))
            return
        self._note_value(trial.trial_id, trial.config, result.get(self.objective))

    def _note_value(self, trial_id: str, config: dict, value) -> None:
        if not isinstance(value, int | float) or value != value:
            return
        overrides = {k: v for k, v in config.get("fixed_trial", {}).items() if k != "label"}
        searched = {k: v for k, v in config.items() if k not in ("fixed_trial", OPTUNA_TRIAL)}
        params = {**self.spec.config, **overrides, **searched}
        row = {"label": trial_label(config, params, self.spec.job), "params": params}
        self.values[trial_id] = (float(value), is_baseline(row, self.job))

    @property
    def best(self) -> tuple[float, str] | None:
        ours = [(v, t, (v, t)) for t, (v, baseline) in self.values.items() if not baseline]
        return pick_best(ours or [(v, t, (v, t)) for t, (v, _) in self.values.items()], self.mode)

    def _seen(self, trials) -> None:
        """On the first event: the trials a resume found ended, counted as done but not in this driver's pace."""
        if self.ended_before is None:
            ended = [t for t in trials if t.status in ("TERMINATED", "ERROR")]
            self.ended_before = sum(sum(ended_members(t, t.status)) for t in ended)
            for trial in ended:
                if trial.status == "TERMINATED":
                    self._note_best(trial)

    def summary(self, trials, ended_now: str, ended_trial=None) -> str:
        """The progress line; `ended_now` ("done" or "failed") is how `ended_trial` (or one plain trial) just
        ended: Tune marks a trial TERMINATED or ERROR only after its callbacks ran."""
        self._seen(trials)
        done = failed = 0
        for trial in trials:
            status = trial.status
            if trial is ended_trial:
                status = "TERMINATED" if ended_now == "done" else "ERROR"
            trial_done, trial_failed = ended_members(trial, status)
            done, failed = done + trial_done, failed + trial_failed
        if ended_trial is None:
            done, failed = done + (ended_now == "done"), failed + (ended_now == "failed")
        elapsed = time.time() - self.start
        best = self.best
        best_text = f"best {self.objective} {best[0]:.4g} (trial {best[1]})" if best else "no best yet"
        planned = self.planned if self.planned is not None else "?"
        left = None if self.planned is None else self.planned - self.ended_before
        return (
            f"        {done}/{planned} done, {failed} failed, {duration(elapsed)} elapsed, "
            f"{eta(elapsed, done + failed - self.ended_before, left)}; {best_text}"
        )

    def on_step_begin(self, iteration, trials, **info):
        self._seen(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if member_states(result):
            self._note_best(trial)
            best = self.best
            shown = f"best {self.objective} {best[0]:.4g} (trial {best[1]})" if best else ""
            self._line(trial, f"epoch {result.get('epoch', '-')}  {shown}")
            return
        shown = "  ".join(f"{m}={result[m]:.4g}" for m in self.metrics if m in result)
        step = f"epoch {result['epoch']}" if "epoch" in result else f"seeds {result.get('seeds_done')}"
        self._line(trial, f"{step}  {shown}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._note_best(trial)
        self._line(trial, "[green]done[/]")
        self._print(self.summary(trials, "done", trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trial, f"[red]FAILED[/] {trial.error_file or ''}")
        self._print(self.summary(trials, "failed", trial))


def ended_members(trial, status: str) -> tuple[int, int]:
    """(done, failed) trials a Tune trial in `status` counts for: itself, or each member of a pack (a member
    that failed alone counts as failed in a pack that finished)."""
    members = trial.config.get(PACK) if isinstance(trial.config, dict) else None
    if status not in ("TERMINATED", "ERROR"):
        return 0, 0
    if not members:
        return (1, 0) if status == "TERMINATED" else (0, 1)
    if status == "ERROR":
        return 0, len(members)
    states = member_states(trial.last_result)
    failed = sum(state.get("status") == "ERROR" for state in states.values())
    return len(members) - failed, failed
