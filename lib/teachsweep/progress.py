"""Console progress for a running sweep: one line per epoch report, and per finished or failed trial the trials
done of those planned, the failed ones, the elapsed time, an estimate of the time left and the best so far."""

from __future__ import annotations

import time

from ray.tune import Callback
from rich.console import Console

from teachsweep import references
from teachsweep.plan import planned_count
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
    def __init__(self, spec: SweepSpec):
        self.metrics = spec.metric_names
        self.objective, self.mode = spec.metric_names[0], spec.mode_names[0]
        try:
            self.planned: int | None = planned_count(spec)
        except references.TeacherReferenceError:  # a teacher sweep gone since the preflight: the plan's size is unknown
            self.planned = None
        self.start = time.time()
        self.best: tuple[float, str] | None = None

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
        better = self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0])
        if better:
            self.best = (float(value), trial.trial_id)

    def _summary(self, trials, ended_now: str) -> None:
        # Tune marks the trial TERMINATED or ERROR after its callbacks ran: count it by the event that called us
        done = sum(t.status == "TERMINATED" for t in trials) + (ended_now == "done")
        failed = sum(t.status == "ERROR" for t in trials) + (ended_now == "failed")
        elapsed = time.time() - self.start
        best = f"best {self.objective} {self.best[0]:.4g} (trial {self.best[1]})" if self.best else "no best yet"
        planned = self.planned if self.planned is not None else "?"
        self._print(f"        {done}/{planned} done, {failed} failed, {duration(elapsed)} elapsed, "
                    f"{eta(elapsed, done + failed, self.planned)}; {best}")  # fmt: skip

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
