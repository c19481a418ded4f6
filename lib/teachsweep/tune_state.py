"""Tune's experiment state, kept restorable across a driver killed at any moment.

Tune writes its snapshot (`experiment_state-<session>.json`, the searcher's `search_gen_state-<session>.json` and
`searcher-state-<session>.pkl`) in a staging directory, then copies the files into the experiment directory in
the background. The copy is not atomic: a driver killed during it leaves a truncated file, `Tuner.restore` then
swallows the parse error and the resume fails with "Can't return results as experiment has not been run".

So the driver keeps a copy of the last snapshot whose files all parse (`KeepLastGoodState`, a Tune callback,
written file by file with an atomic rename), and before a resume `repair` puts that copy back in place of a
truncated snapshot, or moves aside a broken snapshot it has no copy of (Tune then restores the newest whole one,
or, with none, the sweep starts again as a driver that died before its first snapshot does)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ray.tune import Callback
from ray.tune.trainable.metadata import _TrainingRunMetadata

from teachsweep.layout import EXPERIMENT_STATE, STATE_PATTERNS, SweepDir, state_file_parses

SAVE_EVERY_S = 5.0


def snapshot_files(directory: Path) -> dict[str, list[Path]]:
    """The snapshot files in `directory`, by Tune session (the time stamp in their names)."""
    sessions: dict[str, list[Path]] = {}
    for pattern in STATE_PATTERNS:
        prefix, suffix = pattern.split("*")
        for path in directory.glob(pattern):
            sessions.setdefault(path.name.removeprefix(prefix).removesuffix(suffix), []).append(path)
    return sessions


def whole(files: list[Path]) -> bool:
    return bool(files) and all(state_file_parses(f) for f in files)


def copy_atomically(source: Path, target: Path) -> None:
    partial = target.with_name(f".{target.name}.partial")
    shutil.copyfile(source, partial)
    os.replace(partial, target)


class KeepLastGoodState(Callback):
    """Copies each whole snapshot of the experiment into `tune/last_good/` (at most every SAVE_EVERY_S seconds,
    and at the end of the experiment). It finds the experiment directory through its trials, not a path of its
    own: Tune pickles its callbacks with the experiment, and a resumed sweep may have been moved."""

    def __init__(self) -> None:
        self.saved_at = 0.0

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if time.monotonic() - self.saved_at >= SAVE_EVERY_S:
            self.save(trials)

    def on_experiment_end(self, trials: list, **info) -> None:
        self.save(trials)

    def save(self, trials: list) -> None:
        self.saved_at = time.monotonic()
        if not trials:
            return
        save_whole_snapshots(SweepDir.at(Path(trials[0].storage.experiment_fs_path).parent.parent))


def save_whole_snapshots(paths: SweepDir) -> None:
    backup = paths.tune_backup
    for files in snapshot_files(paths.trials).values():
        if not whole(files):
            continue
        backup.mkdir(parents=True, exist_ok=True)
        for source in files:
            target = backup / source.name
            if not target.exists() or target.stat().st_mtime_ns != source.stat().st_mtime_ns:
                copy_atomically(source, target)
                shutil.copystat(source, target)


def repair(paths: SweepDir) -> list[str]:
    """Put the last whole copy in place of each truncated snapshot, or move a broken snapshot with no whole copy
    aside (`<name>.broken`). Returns what it did, a line each, for the run's log."""
    said = []
    backups = snapshot_files(paths.tune_backup) if paths.tune_backup.is_dir() else {}
    present = snapshot_files(paths.trials)
    for session in sorted(set(present) | set(backups)):
        files, copies = present.get(session, []), backups.get(session, [])
        if whole(files):
            continue
        if whole(copies) and {f.name for f in copies} >= {f.name for f in files}:
            for copy in copies:
                copy_atomically(copy, paths.trials / copy.name)
            said.append(f"Tune's snapshot {session} was cut short; restored its last whole copy")
            continue
        if not files:
            continue
        for broken in files:
            broken.rename(broken.with_name(broken.name + ".broken"))
        said.append(f"Tune's snapshot {session} was cut short and had no whole copy; set aside")
    return said


CHECKPOINTS_KEPT = 2  # per trial (CheckpointConfig.num_to_keep); older ones are deleted as new ones register
CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+)")


@dataclass(frozen=True)
class NamedCheckpoints:
    """What a Tune snapshot says of one trial's checkpoints (directory names: the sweep may have moved since)."""

    latest: str  # the one the trial resumes from
    kept: tuple[str, ...]  # those Tune will delete as the trial's next checkpoints register (latest included)


def named_checkpoints(snapshot: str) -> dict[str, NamedCheckpoints]:
    """{trial directory: its checkpoints} for each trial of a snapshot's text that has one, read through Ray's own
    decoder of a trial's run state (the checkpoint bookkeeping is a pickle inside the JSON). Raises ValueError
    when the snapshot or a trial's state cannot be read."""

    named = {}
    try:
        for _, run_state in json.loads(snapshot)["trial_data"]:
            manager = _TrainingRunMetadata.from_json_state(run_state).checkpoint_manager
            if manager.latest_checkpoint_result is None:
                continue
            latest = Path(manager.latest_checkpoint_result.checkpoint.path)
            kept = tuple(Path(r.checkpoint.path).name for r in manager.best_checkpoint_results)
            named[latest.parent.name] = NamedCheckpoints(latest.name, kept)
    except Exception as error:  # a truncated file, a format a newer Ray writes, a pickle that does not load
        raise ValueError(f"{type(error).__name__}: {error}") from error
    return named


def checkpoint_dirs(trial_dir: Path) -> dict[int, Path]:
    """A trial's checkpoint directories on disk, by number."""
    found = {}
    for path in trial_dir.iterdir():
        if (match := CHECKPOINT_DIR.fullmatch(path.name)) and path.is_dir():
            found[int(match.group(1))] = path
    return found


def whole_checkpoint(directory: Path) -> bool:
    """Whether a checkpoint directory was written to its end: a trial's checkpoint is `state.pt`, a zip archive
    (torch.save) whose entries all pass their CRC check; a copy cut short by a kill does not."""
    try:
        with zipfile.ZipFile(directory / "state.pt") as archive:
            return archive.testzip() is None
    except Exception:  # noqa: BLE001 - whatever a damaged archive raises, it is not whole
        return False


def newest_whole_after(trial_dir: Path, number: int) -> Path | None:
    """The trial's newest whole checkpoint numbered after `number`, or None."""
    later = sorted((n, path) for n, path in checkpoint_dirs(trial_dir).items() if n > number)
    return next((path for _, path in reversed(later) if whole_checkpoint(path)), None)


def restore_pruned_checkpoints(paths: SweepDir) -> list[str]:
    """Tune prunes a trial's old checkpoints as soon as new ones register but uploads its snapshot in the
    background (and `repair` may put back a kept copy a few seconds old), so a killed driver can leave the snapshot
    Tune restores (the newest session's) naming checkpoints that are gone: Tune then fails the trial ("does not
    exist on storage anymore"), and deleting a gone one it still tracks raises inside its bookkeeping. Each trial
    is put right (`restore_trial_checkpoints`); what cannot be is left as is and said. Returns what it did, a line
    each, for the run's log."""
    try:
        snapshots = sorted(paths.trials.glob(EXPERIMENT_STATE), key=lambda p: p.name)
        if not snapshots:
            return []
        named = named_checkpoints(snapshots[-1].read_text())
    except (OSError, ValueError) as error:
        return [f"could not read which checkpoints Tune's snapshot names ({error}); left as is"]
    said = []
    for trial, checkpoints in sorted(named.items()):
        trial_dir = paths.trials / trial
        try:
            if trial_dir.is_dir():
                said += restore_trial_checkpoints(trial, trial_dir, checkpoints)
        except OSError as error:
            said.append(f"trial {trial}: could not put back its checkpoints ({error}); left as is")
    return said


def restore_trial_checkpoints(trial: str, trial_dir: Path, checkpoints: NamedCheckpoints) -> list[str]:
    """One trial of `restore_pruned_checkpoints`. When the checkpoint it resumes from (number N) is gone, its
    newest whole later checkpoint is moved into its place (the job state is in the checkpoint: the trial goes on
    from there), after the other later ones, which Tune no longer tracks and the trial writes again, are removed; a
    kill in between leaves that successor to be found again. With no whole later one, an empty directory stands in
    and the trial starts over in its own run (a job reads an empty checkpoint as none). The other gone checkpoints
    Tune tracks come back empty, for Tune to delete."""
    said = []
    latest = trial_dir / checkpoints.latest
    if latest.exists() and not latest.is_dir():
        aside = latest.with_name(f"{latest.name}.not-a-checkpoint")
        latest.rename(aside)
        said.append(f"trial {trial}: {checkpoints.latest} was not a directory; set aside as {aside.name}")
    if not latest.exists():
        match = CHECKPOINT_DIR.fullmatch(checkpoints.latest)
        if match is None:
            return [f"trial {trial}: Tune's snapshot resumes it from {checkpoints.latest!r}, not a checkpoint name"]
        number = int(match.group(1))
        successor = newest_whole_after(trial_dir, number)
        for later, path in checkpoint_dirs(trial_dir).items():
            if later > number and path != successor:
                shutil.rmtree(path)
        if successor is None:
            latest.mkdir()
            said.append(
                f"trial {trial}: {checkpoints.latest}, which Tune's snapshot resumes from, was pruned and no later "
                "checkpoint is whole; the trial starts over in its own run"
            )
        else:
            os.replace(successor, latest)
            said.append(
                f"trial {trial}: {checkpoints.latest}, which Tune's snapshot resumes from, was pruned after the "
                f"snapshot; resuming from {successor.name}, moved into its place"
            )
    for name in checkpoints.kept:
        placeholder = trial_dir / name
        if placeholder.is_dir():
            continue
        if placeholder.exists():
            said.append(f"trial {trial}: {name} is not a directory; Tune will fail to delete it")
            continue
        placeholder.mkdir()
        said.append(f"trial {trial}: {name}, which Tune still tracks, was pruned; an empty one stands in for Tune")
    return said
