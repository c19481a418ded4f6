"""The jobs a sweep can run. Each job is one readable module with a pydantic config class and
`train(config, reporter) -> final metrics`; jobs know nothing about Tune or MLflow."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Job:
    module: str
    config_name: str
    default_metric: str
    default_mode: str

    @property
    def config_class(self) -> Any:
        return getattr(importlib.import_module(self.module), self.config_name)

    @property
    def train(self) -> Any:
        return importlib.import_module(self.module).train


JOBS: dict[str, Job] = {
    "lot": Job("teachsweep.jobs.lot", "LoTConfig", "teacher/best_val_acc", "max"),
    "teacher": Job("teachsweep.jobs.teacher", "TeacherConfig", "teacher/best_val_acc", "max"),
    "scaffold": Job("teachsweep.jobs.scaffold", "ScaffoldConfig", "simulability/best_val", "max"),
    "explain": Job("teachsweep.jobs.explain", "ExplainConfig", "faithfulness/negative_auc", "max"),
}
