"""Console progress for a running sweep: one line per epoch report and per finished or failed trial."""

from __future__ import annotations

import time

from ray.tune import Callback
from rich.console import Console


class Progress(Callback):
    def __init__(self, metrics: list[str]):
        self.metrics = metrics
        self.start = time.time()

    def _line(self, trial, text: str) -> None:
        label = trial.config.get("fixed_trial", {}).get("label", "search")
        Console().print(
            f"[dim]{time.time() - self.start:6.0f}s[/] {trial.trial_id} {label:<16} {text}", highlight=False
        )

    def on_trial_result(self, iteration, trials, trial, result, **info):
        shown = "  ".join(f"{m}={result[m]:.4g}" for m in self.metrics if m in result)
        step = f"epoch {result['epoch']}" if "epoch" in result else f"seeds {result.get('seeds_done')}"
        self._line(trial, f"{step}  {shown}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        done = sum(t.status == "TERMINATED" for t in trials) + 1
        self._line(trial, f"[green]done[/] ({done}/{len(trials)})")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trial, f"[red]FAILED[/] {trial.error_file or ''}")
