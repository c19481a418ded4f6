"""The results directory, laid out in one place: what a sweep keeps on disk beside its tracking store.

    <results>/mlflow.db                   the local MLflow store (unless tracking_uri or $MLFLOW_TRACKING_URI)
    <results>/artifacts/                  its artifacts
    <results>/<sweep>/spec.yaml           the spec as submitted
    <results>/<sweep>/spec.json           its fingerprint: what a resume must not change
    <results>/<sweep>/tracking_uri        the store its runs went to
    <results>/<sweep>/mlflow_parent_run_id
    <results>/<sweep>/planned_trials      how many trials the run planned
    <results>/<sweep>/optuna.db           the Optuna study (searched sweeps); optuna.<time>.abandoned.db, one
                                          a corrected spec started anew
    <results>/<sweep>/tune/               Tune's experiment state (trials/), the last whole copy of its snapshot
                                          (last_good/) and Ray Train storage (train/)
    <results>/<sweep>/report.html, export/
    <results>/<pipeline>/mlflow_pipeline_run_id   a pipeline's own run (its stages are sweeps beside it)

The writer (sweep.py) and the readers (results.py, ui.py, cli/) name these files through `SweepDir` only."""

from __future__ import annotations

import json
import os
import pickletools
from dataclasses import dataclass
from pathlib import Path

DEFAULT_RESULTS = "teachsweep-results"
LOCAL_STORE = "mlflow.db"


def cache_dir() -> Path:
    """Where tokenised splits and teachers trained for a reference are cached ($TEACHSWEEP_CACHE)."""
    return Path(os.environ.get("TEACHSWEEP_CACHE", Path.home() / ".cache" / "teachsweep"))


def missing_sqlite_file(url: str) -> bool:
    """A `sqlite:///` URL whose file is absent (opening it would create an empty store)."""
    return url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file()


def default_tracking_uri(results_dir: Path) -> str:
    """The MLflow store a sweep logs to when its spec names none: $MLFLOW_TRACKING_URI, else the local store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{results_dir.resolve() / LOCAL_STORE}"


# The files of one Tune snapshot, per driver session: the experiment's state and its searcher's.
EXPERIMENT_STATE = "experiment_state-*.json"
STATE_PATTERNS = (EXPERIMENT_STATE, "search_gen_state-*.json", "searcher-state-*.pkl")


def state_file_parses(path: Path) -> bool:
    """Whether a Tune snapshot file is whole: a copy cut short by a killed driver does not parse. Pickles (Tune
    writes its search generator's state as one, under a .json name) are walked opcode by opcode to their STOP,
    which builds no object and runs no code. An empty searcher file is whole: a grid's searcher saves nothing."""
    try:
        data = path.read_bytes()
        if data.startswith(b"\x80"):
            *_, (last, _, _) = pickletools.genops(data)
            return last.name == "STOP"
        if path.suffix == ".pkl" and not data:
            return True
        json.loads(data)
    except (OSError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class SweepDir:
    root: Path  # the results directory shared by sweeps (the local MLflow store lives here)
    path: Path  # this sweep's directory

    @classmethod
    def of(cls, name: str, results_dir: str | Path) -> SweepDir:
        root = Path(results_dir).expanduser().resolve()
        return cls(root, root / name)

    @classmethod
    def at(cls, path: Path) -> SweepDir:
        return cls(path.parent, path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def spec_file(self) -> Path:
        return self.path / "spec.yaml"

    @property
    def fingerprint(self) -> Path:
        return self.path / "spec.json"

    @property
    def tracking_uri(self) -> Path:
        return self.path / "tracking_uri"

    @property
    def parent_run(self) -> Path:
        return self.path / "mlflow_parent_run_id"

    @property
    def planned(self) -> Path:
        return self.path / "planned_trials"

    @property
    def optuna_file(self) -> Path:
        return self.path / "optuna.db"

    def abandoned_study(self, stamp: str, n: int = 0) -> Path:
        """Where a study a corrected spec started anew is kept (`optuna.<time>[-n].abandoned.db`)."""
        return self.path / f"optuna.{stamp}{f'-{n}' if n else ''}.abandoned.db"

    @property
    def optuna_url(self) -> str:
        return f"sqlite:///{self.optuna_file}"

    @property
    def tune(self) -> Path:
        return self.path / "tune"

    @property
    def trials(self) -> Path:
        """Tune's experiment directory."""
        return self.tune / "trials"

    @property
    def train_runs(self) -> Path:
        """Where multi-worker trials keep their Ray Train runs."""
        return self.tune / "train"

    @property
    def driver_lock(self) -> Path:
        """Held (flock) by the driver running the sweep; says which (sweep.hold_driver_lock)."""
        return self.path / "driver.lock"

    @property
    def tune_backup(self) -> Path:
        """The last whole copy of Tune's snapshot (tune_state.py)."""
        return self.tune / "last_good"

    @property
    def report(self) -> Path:
        return self.path / "report.html"

    @property
    def export(self) -> Path:
        return self.path / "export"

    @property
    def local_store(self) -> Path:
        """The SQLite MLflow store of the results directory this sweep sits in now."""
        return self.root / LOCAL_STORE

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def pipeline_run(self) -> Path:
        """A pipeline's MLflow run id, when this directory is a pipeline's (its stages are sweeps beside it)."""
        return self.path / "mlflow_pipeline_run_id"

    @property
    def started(self) -> bool:
        """Whether Tune recorded a whole snapshot of this sweep's trials (a driver that died between writing
        `tuner.pkl` and its first snapshot, or while copying it, leaves an experiment Tune calls restorable but
        cannot restore)."""
        kept = [*self.trials.glob(EXPERIMENT_STATE), *self.tune_backup.glob(EXPERIMENT_STATE)]
        return any(state_file_parses(path) for path in kept)
