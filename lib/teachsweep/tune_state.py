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

import os
import shutil
import time
from pathlib import Path

from ray.tune import Callback

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


def named_checkpoints(snapshot: Path) -> dict[str, str]:
    """The checkpoint each trial in a Tune snapshot resumes from: {trial directory: checkpoint directory}, names
    only (the sweep may have moved since). Read through Ray's own decoder of a trial's run state; a snapshot it
    cannot read names nothing."""
    import json

    from ray.tune.trainable.metadata import _TrainingRunMetadata

    try:
        trials = json.loads(snapshot.read_text())["trial_data"]
        named = {}
        for _, run_state in trials:
            latest = _TrainingRunMetadata.from_json_state(run_state).checkpoint_manager.latest_checkpoint_result
            if latest is not None:
                path = Path(latest.checkpoint.path)
                named[path.parent.name] = path.name
        return named
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError):
        return {}


def checkpoint_number(directory: Path) -> int:
    return int(directory.name.rpartition("_")[2])


def complete_successor(trial_dir: Path, pruned: str) -> Path | None:
    """The checkpoint to resume from in place of `pruned`, one Tune deleted after the snapshot naming it was
    written. Tune deletes checkpoint N when it registers N + CHECKPOINTS_KEPT, so that one was whole; so is every
    checkpoint older than the newest on disk (a trial writes them one after another). The newest may be a copy
    cut short by the kill."""
    on_disk = sorted(trial_dir.glob("checkpoint_*"), key=checkpoint_number)
    if not on_disk:
        return None
    newest, registered = checkpoint_number(on_disk[-1]), checkpoint_number(trial_dir / pruned) + CHECKPOINTS_KEPT
    whole_ones = [c for c in on_disk if checkpoint_number(c) <= registered or checkpoint_number(c) < newest]
    return whole_ones[-1] if whole_ones else None


def restore_pruned_checkpoints(paths: SweepDir) -> list[str]:
    """Tune writes its snapshot every few seconds but prunes a trial's old checkpoints as soon as new ones
    register, so a driver killed in between leaves a snapshot naming a checkpoint that is gone, and Tune fails
    that trial's resume ("does not exist on storage anymore"). Each such checkpoint is put back as a copy of the
    trial's newest whole one: the trial resumes from there (its job state is in the checkpoint). Returns what it
    did, a line each, for the run's log."""
    said = []
    for snapshot in sorted(paths.trials.glob(EXPERIMENT_STATE)):
        for trial, checkpoint in named_checkpoints(snapshot).items():
            trial_dir = paths.trials / trial
            if not trial_dir.is_dir() or (trial_dir / checkpoint).exists():
                continue
            successor = complete_successor(trial_dir, checkpoint)
            if successor is None:
                said.append(f"trial {trial}: {checkpoint}, which Tune's snapshot resumes from, is gone")
                continue
            partial = trial_dir / f".{checkpoint}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(successor, partial)
            os.replace(partial, trial_dir / checkpoint)
            said.append(
                f"trial {trial}: {checkpoint}, which Tune's snapshot resumes from, was pruned after the snapshot; "
                f"resuming from a copy of {successor.name}"
            )
    return said
