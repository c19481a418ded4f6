"""How a teacher reference is written (the forms are described in references.py, which resolves them): its
prefixes, the `sweep:` selector, the files a saved teacher holds, and the error that names the field. The
results reader parses the references its runs recorded with these, below any resolution."""

from __future__ import annotations

MLFLOW = "mlflow:"
SWEEP = "sweep:"
SELECTORS = ("best", "each")
CHECKPOINT_FILES = ("model.pt", "config.json")


class TeacherReferenceError(ValueError):
    """A teacher reference that cannot be resolved; the message names the field."""


def parse_sweep(value: str, field: str) -> tuple[str, str]:
    """`sweep:<name>/<selector>` -> (name, selector); the selector defaults to `best`."""
    name, _, selector = value.removeprefix(SWEEP).partition("/")
    if not name:
        raise TeacherReferenceError(
            f"{field}: '{value}': give sweep:<name>/best, sweep:<name>/<trial id> or sweep:<name>/each"
        )
    return name, selector or "best"
