"""MLflow layout: one experiment per sweep, a parent run per sweep, a child run per trial.

Runs are found-or-created by tags (`teachsweep.sweep`, `teachsweep.trial_id`), so a retried or resumed trial
logs into the run it already has. Every call goes through `retry`: several trial processes writing one SQLite
file can see "database is locked", which a short back-off resolves."""

from __future__ import annotations

import json
import os
import random
import subprocess
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from teachsweep.layout import LOCAL_STORE, default_tracking_uri  # noqa: F401 (read as tracking.default_tracking_uri)
from teachsweep.metrics import with_intervals
from teachsweep.reporter import Reporter, finite_metrics

# MLflow draws a tqdm bar for every artifact download (a teacher, a report figure's data): noise in the CLI's output
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

T = TypeVar("T")
PARENT, TRIAL, SEED = "parent", "trial", "seed"


class TrackingError(RuntimeError):
    pass


def check_tracking_uri(uri: str) -> None:
    """Fail before any trial starts when the tracking store cannot be reached."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
                if response.status != 200:
                    raise TrackingError(f"MLflow tracking URI {uri} answered {response.status} on /health")
        except OSError as error:
            raise TrackingError(f"MLflow tracking URI {uri} is unreachable: {error}") from None
    elif uri.startswith("sqlite:///"):
        parent = Path(uri.removeprefix("sqlite:///")).parent
        existing = next((p for p in [parent, *parent.parents] if p.exists()), None)
        if existing is None or not os.access(existing, os.W_OK):
            raise TrackingError(f"MLflow store directory {parent} is not writable")
    elif "://" in uri and not uri.startswith(("file://", "databricks", "postgresql", "mysql")):
        raise TrackingError(f"MLflow tracking URI {uri}: unsupported scheme")


def retry(call: Callable[[], T], attempts: int = 8, first_wait: float = 0.2) -> T:
    """Retry a tracking call on transient store errors (SQLite locks, HTTP hiccups) with jittered back-off."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - MLflow wraps store errors in several exception types
            transient = any(s in str(error).lower() for s in ("database is locked", "timed out", "connection", "503"))
            if not transient or attempt == attempts - 1:
                raise
            time.sleep(first_wait * 2**attempt * (0.5 + random.random()))
    raise AssertionError("unreachable")


def client_for(uri: str):
    from mlflow.tracking import MlflowClient  # heavy: the reading commands import this module without loading it

    return MlflowClient(tracking_uri=uri)


class RetryingClient:
    """An MlflowClient whose every call goes through `retry`: what the readers use, so that reading a sweep
    while its trials write to the same SQLite store (or a server restarts) retries as the writers do."""

    def __init__(self, uri: str):
        self._client = client_for(uri)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if not callable(method):
            return method
        return lambda *args, **kwargs: retry(lambda: method(*args, **kwargs))


def flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = str(value)[:6000]
    return flat


CODE_DIR = Path(__file__).resolve().parent  # the code a run runs: its commit, and whether it was edited


def git_commit(directory: Path | None = None) -> str | None:
    try:
        command = ["git", "rev-parse", "HEAD"]
        out = subprocess.run(command, capture_output=True, text=True, timeout=5, cwd=directory or CODE_DIR)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def git_dirty(directory: Path | None = None) -> bool | None:
    """Whether the code in `directory` differs from its repository's commit: tracked files changed, or files git
    does not know (a new module the jobs import) that it does not ignore either; the rest of the repository
    (docs, result rows) does not count. None: not a git checkout (an installed package, a cluster's copy)."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all", "--", "."],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=directory or CODE_DIR,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def code_tags(directory: Path | None = None) -> dict[str, str]:
    """The commit a run ran and whether its tree was dirty, as MLflow tags."""
    commit, dirty = git_commit(directory), git_dirty(directory)
    tags = {"mlflow.source.git.commit": commit} if commit else {}
    return tags | {"teachsweep.git_dirty": "unknown" if dirty is None else str(dirty).lower()}


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI opens its model-training view,
# not the GenAI overview (traces, prompts) that MLflow 3 shows experiments of unknown kind


def ensure_experiment(client, name: str, artifact_root: str | None = None) -> str:
    experiment = retry(lambda: client.get_experiment_by_name(name))
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            retry(lambda: client.restore_experiment(experiment.experiment_id))
        if experiment.tags.get("mlflow.experimentKind") is None:
            for key, value in EXPERIMENT_KIND.items():
                retry(lambda: client.set_experiment_tag(experiment.experiment_id, key, value))  # noqa: B023
        return experiment.experiment_id
    try:
        location = f"{artifact_root}/{name}" if artifact_root else None
        return retry(lambda: client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND))
    except Exception:  # noqa: BLE001 - created concurrently by another process
        return retry(lambda: client.get_experiment_by_name(name)).experiment_id


def find_run(client, experiment_id: str, tags: dict[str, str]) -> str | None:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = retry(lambda: client.search_runs([experiment_id], filter_string=query, max_results=2))
    return runs[0].info.run_id if runs else None


def log_params(client, run_id: str, params: dict[str, Any], fresh: bool = False) -> None:
    """The run's params, but those it holds already (`fresh`: a run just created holds none)."""
    from mlflow.entities import Param  # heavy: the reading commands import this module without loading it

    flat = flatten(params)
    existing = {} if fresh else retry(lambda: client.get_run(run_id)).data.params
    new = [Param(k, v) for k, v in flat.items() if k not in existing]
    for start in range(0, len(new), 100):
        retry(lambda s=start: client.log_batch(run_id, params=new[s : s + 100]))


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric  # heavy: the reading commands import this module without loading it

    now = int(time.time() * 1000)
    batch = [Metric(k, v, now, step) for k, v in finite_metrics(metrics).items()]
    for start in range(0, len(batch), 500):
        retry(lambda s=start: client.log_batch(run_id, metrics=batch[s : s + 500]))


def start_parent_run(
    client,
    experiment_id: str,
    sweep: str,
    params: dict[str, Any],
    spec_text: str,
    run_id: str | None,
    extra_tags: dict[str, str] | None = None,
) -> str:
    """Resume the sweep's parent run `run_id`, or create one (logging the spec) when the sweep is new.

    The run id lives in the sweep's results directory, next to the Tune and Optuna state it belongs to, so
    a sweep deleted and started again gets a fresh parent run instead of inheriting stale children."""
    if run_id is None:
        tags = {"teachsweep.sweep": sweep, "teachsweep.role": PARENT} | (extra_tags or {})
        run_tags = tags | code_tags()
        run_id = retry(lambda: client.create_run(experiment_id, run_name=sweep, tags=run_tags)).info.run_id
        retry(lambda: client.log_text(run_id, spec_text, "spec.yaml"))
    else:
        retry(lambda: client.update_run(run_id, status="RUNNING"))
    log_params(client, run_id, params)
    return run_id


def start_child_run(
    client, experiment_id: str, parent_run_id: str, key: str, name: str, tags: dict[str, str], params: dict
) -> str:
    """Find or create the run identified by `key` (a trial id, or trial id + seed) under `parent_run_id`."""
    ident = {"teachsweep.run_key": key}
    run_id = find_run(client, experiment_id, ident | {"mlflow.parentRunId": parent_run_id})
    if run_id is None:
        all_tags = ident | tags | {"mlflow.parentRunId": parent_run_id}
        run_id = retry(lambda: client.create_run(experiment_id, run_name=name, tags=all_tags)).info.run_id
    else:
        retry(lambda: client.update_run(run_id, status="RUNNING"))
    log_params(client, run_id, params)
    return run_id


def start_member_runs(
    client, experiment_id: str, parent_run_id: str, pack_id: str, members: list[tuple[str, str, dict, dict]]
) -> list[tuple[str, bool]]:
    """A pack's member runs, each (key, name, tags, params) found again by its key or created: one search for the
    whole pack, and a created run gets its tags at creation and its params without a read. (run id, created)."""
    from mlflow.entities import RunTag  # heavy: the reading commands import this module without loading it

    query = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`teachsweep.pack_id` = '{pack_id}'"
    found = retry(lambda: client.search_runs([experiment_id], filter_string=query, max_results=10000))
    by_key = {run.data.tags.get("teachsweep.run_key"): run.info.run_id for run in found}
    started = []
    for key, name, tags, params in members:
        all_tags = {"teachsweep.run_key": key, **tags, "mlflow.parentRunId": parent_run_id}
        run_id = by_key.get(key)
        if run_id is None:
            run_id = retry(lambda: client.create_run(experiment_id, run_name=name, tags=all_tags)).info.run_id  # noqa: B023
            log_params(client, run_id, params, fresh=True)
            started.append((run_id, True))
            continue
        retry(lambda r=run_id: client.update_run(r, status="RUNNING"))
        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        retry(lambda r=run_id, b=batch: client.log_batch(r, tags=b))
        log_params(client, run_id, params)
        started.append((run_id, False))
    return started


def any_trial_reported(uri: str, parent_run_id: str) -> bool:
    """Whether a trial under this parent run logged any metric (a sweep stopped before that holds no result,
    so a corrected spec may start it anew). Unreadable store: assume it did (nothing is thrown away)."""
    try:
        client = client_for(uri)
        experiment_id = retry(lambda: client.get_run(parent_run_id)).info.experiment_id
        query = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`teachsweep.role` = '{TRIAL}'"
        runs = retry(lambda: client.search_runs([experiment_id], filter_string=query, max_results=10000))
    except Exception:  # noqa: BLE001 - any store error: keep the sweep as it is
        return True
    return any(run.data.metrics for run in runs)


def drop_orphan_trial_runs(client, experiment_id: str, parent_run_id: str, known_trial_ids: set[str]) -> list[str]:
    """Soft-delete the trial runs (and their seed runs) of trials Ray Tune never recorded.

    Tune snapshots its experiment state every few seconds; a driver killed between a trial's start and the
    next snapshot leaves an MLflow run for a trial the resumed sweep does not know and runs again under a
    new id. That run is marked KILLED, tagged with the reason and deleted (recoverable in the MLflow UI), so
    every trial of the sweep keeps exactly one run."""
    query = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`teachsweep.role` = '{TRIAL}'"
    runs = retry(lambda: client.search_runs([experiment_id], filter_string=query, max_results=10000))
    reason = "the driver died before Ray Tune recorded this trial; it ran again as a new trial"

    def tune_trial(run) -> str | None:  # a pack member's run belongs to its pack's Tune trial
        return run.data.tags.get("teachsweep.pack_id") or run.data.tags.get("teachsweep.trial_id")

    orphans = [r for r in runs if tune_trial(r) not in known_trial_ids]
    for run in orphans:
        seed_query = f"tags.`mlflow.parentRunId` = '{run.info.run_id}'"
        seed_runs = retry(lambda q=seed_query: client.search_runs([experiment_id], filter_string=q))
        for orphan in [*seed_runs, run]:
            orphan_id = orphan.info.run_id
            retry(lambda r=orphan_id: client.set_tag(r, "teachsweep.orphaned", reason))
            if orphan.info.status == "RUNNING":
                retry(lambda r=orphan_id: client.set_terminated(r, status="KILLED"))
            retry(lambda r=orphan_id: client.delete_run(r))
    return [r.info.run_id for r in orphans]


def finish_run(client, run_id: str, error: BaseException | None = None) -> None:
    if error is not None:
        message = f"{type(error).__name__}: {error}"
        retry(lambda: client.set_tag(run_id, "teachsweep.error", message[:5000]))
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        retry(lambda: client.log_text(run_id, text, "error.txt"))
    retry(lambda: client.set_terminated(run_id, status="FAILED" if error else "FINISHED"))


def load_state(directory: Path) -> dict | None:
    """A trial's checkpointed state, or None for an empty checkpoint directory (one put back in place of a
    checkpoint Tune pruned, with nothing whole to take its place: tune_state.restore_trial_checkpoints): the trial
    starts over. A checkpoint that lost its state.pt fails as before."""
    import torch  # heavy: the reading commands import this module without loading it

    if directory.is_dir() and not any(directory.iterdir()):
        return None
    return torch.load(directory / "state.pt", weights_only=True, map_location="cpu")


class TrialReporter(Reporter):
    """Reports each epoch to MLflow (rank 0 only) and, when `to_tune`, to Ray Tune for Optuna and ASHA."""

    def __init__(
        self, client, run_id: str, to_tune: bool = True, rank: int = 0, extra: dict | None = None, report=None
    ):
        """`report` sends a result to Ray: `ray.tune.report` in a trial (the default), `ray.train.report` in a
        Train worker (every rank calls it: it is a barrier)."""
        super().__init__()
        self.client, self.run_id, self.to_tune, self.rank = client, run_id, to_tune, rank
        self.extra = extra or {}
        self.send = report
        self.logged_before: set[int] | None = None  # epochs this run holds from an attempt that died

    def report(self, metrics: dict[str, float], epoch: int, checkpoint: dict | None = None) -> None:
        super().report(metrics, epoch)
        if self.rank == 0 and metrics:
            if self.logged_before is None:
                # A trial restarted from its last checkpoint replays the epochs its dead attempt had logged after
                # that checkpoint (bit-for-bit on CPU): each epoch is logged once, by the attempt that got there.
                key = next(iter(metrics))
                history = retry(lambda: self.client.get_metric_history(self.run_id, key))
                self.logged_before = {m.step for m in history}
            if epoch not in self.logged_before:  # accuracies with their Wilson intervals (metrics.with_intervals)
                log_metrics(self.client, self.run_id, with_intervals(metrics), step=epoch)
        if not self.to_tune:
            return
        if self.send is None:
            from ray import tune  # heavy: the reading commands import this module without loading it

            self.send = tune.report
        result = finite_metrics(metrics) | {"epoch": epoch} | self.extra
        if checkpoint is None or self.rank != 0:
            self.send(result)
            return

        import torch  # heavy: the reading commands import this module without loading it
        from ray.tune import Checkpoint  # heavy: the reading commands import this module without loading it

        with tempfile.TemporaryDirectory() as directory:
            torch.save(checkpoint, f"{directory}/state.pt")
            self.send(result, checkpoint=Checkpoint.from_directory(directory))

    def restore(self) -> dict | None:
        if not self.to_tune:
            return None
        if self.send is not None and self.send.__module__.startswith("ray.train"):
            from ray.train import get_checkpoint  # heavy: the reading commands import this module without loading it
        else:
            from ray.tune import get_checkpoint  # heavy: the reading commands import this module without loading it
        checkpoint = get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            return load_state(Path(directory))

    def log_dict(self, name: str, obj: dict) -> None:
        super().log_dict(name, obj)
        if self.rank == 0:
            retry(lambda: self.client.log_dict(self.run_id, obj, name))

    def log_file(self, path) -> None:
        super().log_file(path)
        if self.rank == 0:
            retry(lambda: self.client.log_artifact(self.run_id, str(path)))

    def log_teacher(self, state: dict, config: dict) -> None:
        super().log_teacher(state, config)
        if self.rank != 0:
            return

        import torch  # heavy: the reading commands import this module without loading it

        with tempfile.TemporaryDirectory() as directory:
            torch.save(state, f"{directory}/model.pt")
            with open(f"{directory}/config.json", "w") as f:
                json.dump(config, f, indent=1)
            for name in ("model.pt", "config.json"):
                retry(lambda name=name: self.client.log_artifact(self.run_id, f"{directory}/{name}"))
        retry(lambda: self.client.set_tag(self.run_id, "teachsweep.teacher_artifact", "model.pt"))
