"""The one object a job talks to about results. Jobs call `report(metrics, epoch)` once per epoch and know
nothing about Tune or MLflow; `TrialReporter` (in tracking.py) forwards to both."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any


class Reporter:
    """Keeps every report in memory: what tests, benchmarks and plain Python calls of a job use."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []
        self.artifacts: dict[str, Any] = {}

    def report(self, metrics: dict[str, float], epoch: int, checkpoint: dict | None = None) -> None:
        """One epoch's metrics; `checkpoint` (state dicts and counters) lets a restarted trial resume here."""
        self.history.append({"epoch": epoch, **metrics})
        if checkpoint is not None:
            self.saved = checkpoint

    def restore(self) -> dict | None:
        """The last checkpoint of this trial when it is being restarted after a failure, else None."""
        return None

    def log_dict(self, name: str, obj: dict) -> None:
        """A small JSON artifact (head coefficients, confusion matrices...)."""
        self.artifacts[name] = json.loads(json.dumps(obj))

    def log_file(self, path: str | Path) -> None:
        self.artifacts[Path(path).name] = str(path)

    def log_figure(self, figure: Any, name: str) -> None:
        """A matplotlib figure as the PNG artifact NAME (through `log_file`); the figure is closed."""
        import matplotlib.pyplot as plt  # heavy: only the jobs that draw figures load it

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            figure.savefig(path, dpi=100, bbox_inches="tight")
            self.log_file(path)
        plt.close(figure)

    def log_teacher(self, state: dict, config: dict) -> None:
        """The teacher a later stage should load as a frozen teacher: its state_dict (tensors only, loadable with
        weights_only=True) and its teacher config, saved as `model.pt` and `config.json` of the trial's run."""
        self.teacher = {"state": state, "config": json.loads(json.dumps(config))}

    @property
    def last(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


def finite_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Plain floats, without the NaN/inf values MLflow refuses."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(float(v))}


class PackReporter:
    """What a packed job talks to: one Reporter per member (its own metrics, artifacts and saved teacher) and the
    pack's epoch boundary, where the pack checkpoints once and learns which members to stop. This one keeps
    everything in memory (tests, benchmarks, plain Python); the sweep's (tracking.py) records each member in its
    own MLflow run and Optuna trial."""

    def __init__(self, members: list[Reporter]) -> None:
        self.members = members
        self.failed: dict[int, BaseException] = {}

    def early_stops(self, epoch: int, results: dict[int, dict[str, float]]) -> set[int]:
        """The members (by index) that early stopping ends after this epoch's `results`: none here; in a sweep,
        ASHA's rule for each searched member. Asked before `report`, so the checkpoint leaves them out."""
        return set()

    def report(self, epoch: int, results: dict[int, dict[str, float]], checkpoint: dict | None = None) -> None:
        """This epoch's metrics of each member that trained it (by member index), and the pack's checkpoint."""
        for member, metrics in results.items():
            self.members[member].report(metrics, epoch)
        if checkpoint is not None:
            self.saved = checkpoint

    def fail(self, member: int, error: BaseException) -> None:
        """A member whose training failed (a loss that went NaN): it leaves the pack, the others go on."""
        self.failed[member] = error

    def restore(self) -> dict | None:
        """The pack's last checkpoint when it is being restarted after a failure, else None."""
        return None
