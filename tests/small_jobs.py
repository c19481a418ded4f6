"""Job configs and sweep specs small enough for a test, shared by several test files."""

from pathlib import Path
from typing import Any


def tiny_bert_teacher(steps_per_epoch: int = 5, max_train_examples: int = 128) -> dict[str, Any]:
    """A tiny-bert teacher job on rotten_tomatoes that trains in seconds."""
    return dict(
        task="rotten_tomatoes",
        model="tiny-bert",
        lr=1e-3,
        epochs=1,
        steps_per_epoch=steps_per_epoch,
        max_eval_examples=32,
        max_length=24,
        max_train_examples=max_train_examples,
    )


def vit_digits_teacher(model: str) -> dict[str, Any]:
    """A ViT teacher job on digits that trains in seconds: 5 steps, 32 evaluation examples."""
    return dict(task="digits", model=model, lr=1e-3, epochs=1, steps_per_epoch=5, max_eval_examples=32)


def small_scaffold_job(teacher: dict[str, Any], explainer: str, max_epochs: int, **fields: Any) -> dict[str, Any]:
    """A scaffold job on 32 training and 32 evaluation examples in batches of 8; `fields` add or override."""
    job = dict(teacher=teacher, explainer=explainer, num_train_examples=32, batch_size=8, max_eval_examples=32)
    return job | dict(max_epochs=max_epochs, **fields)


def lot_search_spec(
    name: str, config: str, trials: int, max_student_steps: int, results: Path, lowest_alpha: float = 0.1
) -> str:
    """The YAML of a LoT sweep that samples alpha (log-uniform, up to 1) and the student's steps `trials` times, all
    trials at once; `config` is the job's config as one YAML flow mapping."""
    return f"""
name: {name}
job: lot
config: {config}
space:
  alpha: {{type: loguniform, low: {lowest_alpha}, high: 1.0}}
  student_steps: {{type: int, low: 1, high: {max_student_steps}}}
num_samples: {trials}
max_concurrent_trials: {trials}
results_dir: {results}
"""
