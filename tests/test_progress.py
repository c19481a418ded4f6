"""The progress line of a running sweep: what a resumed driver counts, how it paces the rest, which best it names."""

from types import SimpleNamespace

from teachsweep.progress import Progress
from teachsweep.spec import parse_spec

SPEC = """
name: p
job: lot
config: {task: digits, teacher: cnn}
space: {alpha: {type: uniform, low: 0.1, high: 1.0}}
num_samples: 6
baseline: {budget: teacher_steps}
"""


def trial(trial_id: str, status: str, value: float | None = None, arm: str | None = None) -> SimpleNamespace:
    """What the callback reads of a Tune trial: its id, status, last result and config."""
    config = {"fixed_trial": {"label": arm, "arm": arm}} if arm else {"alpha": 0.5}
    result = {"teacher/best_val_acc": value} if value is not None else {}
    return SimpleNamespace(trial_id=trial_id, status=status, last_result=result, config=config)


def test_a_resumed_sweep_counts_the_trials_it_found_but_paces_only_by_those_it_ran():
    progress = Progress(parse_spec(SPEC))
    assert progress.planned == 7  # six searched trials and the teacher-only arm
    found = [
        trial("a", "TERMINATED", 0.71),
        trial("b", "TERMINATED", 0.65),
        trial("c", "TERMINATED", 0.60),
        trial("d", "PENDING"),
    ]
    progress.on_step_begin(0, found)
    progress.start -= 100  # this driver ran one trial in 100 s
    found[3].status, found[3].last_result = "RUNNING", {"teacher/best_val_acc": 0.62}
    progress._note_best(found[3])
    line = progress.summary(found, "done")
    # 4 of 7 done; 3 left at this driver's pace of 100 s per trial (not 25 s, which counting the found ones gives)
    assert line.strip().startswith("4/7 done, 0 failed, 1 min 40 s elapsed, ETA 5 min 00 s"), line
    assert line.endswith("best teacher/best_val_acc 0.71 (trial a)"), line  # a trial finished before the resume


def test_the_best_so_far_is_never_a_baseline_arm_while_a_searched_trial_has_reported():
    progress = Progress(parse_spec(SPEC))
    progress.on_step_begin(0, [])
    progress._note_best(trial("base", "RUNNING", 0.90, arm="teacher_only"))
    assert progress.best == (0.90, "base")  # the only one so far
    progress._note_best(trial("a", "RUNNING", 0.70))
    assert progress.best == (0.70, "a")
