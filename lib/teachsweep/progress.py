"""Console progress for a running sweep: one line per epoch report, and per finished or failed trial the trials
done of those planned, the failed ones, the elapsed time, an estimate of the time left and the best so far."""

from __future__ import annotations

import time

from ray.tune import Callback
from rich.console import Console

from teachsweep import references
from teachsweep.jobs import JOBS
from teachsweep.plan import planned_count
from teachsweep.results import is_baseline, pick_best
from teachsweep.spec import SweepSpec


def duration(seconds: float) -> str:
    """'42 s', '3 min 05 s', '2 h 07 min'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


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
        try:
            self.planned: int | None = planned_count(spec)
        except references.TeacherReferenceError:  # a teacher sweep gone since the preflight: the plan's size is unknown
            self.planned = None
        self.start = time.time()
        self.values: dict[str, tuple[float, bool]] = {}  # trial id -> (objective, is a baseline arm)
        self.ended_before: int | None = None  # trials already ended when this driver started (a resume)

    @staticmethod
    def _print(text: str) -> None:
        Console(highlight=False).print(text)  # made each time: Tune pickles its callbacks, a Console holds a lock

    def _line(self, trial, text: str) -> None:
        label = trial.config.get("fixed_trial", {}).get("label", "search")
        self._print(f"[dim]{time.time() - self.start:6.0f}s[/] {trial.trial_id} {label:<16} {text}")

    def _note_best(self, trial) -> None:
        value = (trial.last_result or {}).get(self.objective)
        if not isinstance(value, int | float) or value != value:
            return
        config = dict(trial.config)
        overrides = dict(config.pop("fixed_trial", {}))
        label = overrides.pop("label", None) or str({**self.spec.config, **config}.get("arm", self.job.default_arm))
        row = {"label": label, "params": {**self.spec.config, **overrides, **config}}
        self.values[trial.trial_id] = (float(value), is_baseline(row, self.job))

    @property
    def best(self) -> tuple[float, str] | None:
        ours = [(v, t, (v, t)) for t, (v, baseline) in self.values.items() if not baseline]
        return pick_best(ours or [(v, t, (v, t)) for t, (v, _) in self.values.items()], self.mode)

    def _seen(self, trials) -> None:
        """On the first event: the trials a resume found ended, counted as done but not in this driver's pace."""
        if self.ended_before is None:
            ended = [t for t in trials if t.status in ("TERMINATED", "ERROR")]
            self.ended_before = len(ended)
            for trial in ended:
                if trial.status == "TERMINATED":
                    self._note_best(trial)

    def summary(self, trials, ended_now: str) -> str:
        self._seen(trials)
        # Tune marks the trial TERMINATED or ERROR after its callbacks ran: count it by the event that called us
        done = sum(t.status == "TERMINATED" for t in trials) + (ended_now == "done")
        failed = sum(t.status == "ERROR" for t in trials) + (ended_now == "failed")
        elapsed = time.time() - self.start
        best = self.best
        best_text = f"best {self.objective} {best[0]:.4g} (trial {best[1]})" if best else "no best yet"
        planned = self.planned if self.planned is not None else "?"
        left = None if self.planned is None else self.planned - self.ended_before
        return (
            f"        {done}/{planned} done, {failed} failed, {duration(elapsed)} elapsed, "
            f"{eta(elapsed, done + failed - self.ended_before, left)}; {best_text}"
        )

    def _summary(self, trials, ended_now: str) -> None:
        self._print(self.summary(trials, ended_now))

    def on_step_begin(self, iteration, trials, **info):
        self._seen(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        shown = "  ".join(f"{m}={result[m]:.4g}" for m in self.metrics if m in result)
        step = f"epoch {result['epoch']}" if "epoch" in result else f"seeds {result.get('seeds_done')}"
        self._line(trial, f"{step}  {shown}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._note_best(trial)
        self._line(trial, "[green]done[/]")
        self._summary(trials, "done")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trial, f"[red]FAILED[/] {trial.error_file or ''}")
        self._summary(trials, "failed")
