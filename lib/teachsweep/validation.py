"""The validation context that decides whether a config's data files must exist (light: no torch)."""

from __future__ import annotations

from pydantic import ValidationInfo

CHECK_FILES = {"check_files": True}  # validation context of the preflight: data files must exist as named


def checks_files(info: ValidationInfo) -> bool:
    """Whether this validation opens the data files a config names: the preflight's does (pass CHECK_FILES as the
    context); reading a finished sweep's spec back does not, so a moved csv never breaks reading."""
    return bool(info.context and info.context.get("check_files"))
