"""The job protocol: every job declares itself with one typed JobSpec, and a misspelt declaration is an error."""

import dataclasses
import importlib
import subprocess
import sys

import pytest
from pydantic import BaseModel

from teachsweep.jobs import JOBS, MODULES, JobSpec

# the explain job reports its objective (`faithfulness/...`) when a trial explains with one explainer
EXAMPLE = {"explain": {"explainers": ["relevance"]}}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_job_declares_one_jobspec_with_its_config_model_and_hooks(name):
    declared = importlib.import_module(MODULES[name]).JOB
    assert isinstance(declared, JobSpec)
    assert issubclass(declared.config, BaseModel) and declared.config.model_config.get("extra") == "forbid"
    assert callable(declared.train) and callable(declared.metrics)
    metric, mode = declared.objective
    assert mode in ("max", "min") and metric in JOBS[name].metrics(EXAMPLE.get(name, {}))
    for hook in ("check", "fixed_arms", "compare", "baselines", "uncompared", "selection_split"):
        assert getattr(declared, hook) is None or callable(getattr(declared, hook)), hook
    assert (declared.fixed_arms is None) == (declared.baselines is None) == (declared.compare is None)


def test_a_misspelt_declaration_is_refused_where_it_is_written():
    fields = {f.name for f in dataclasses.fields(JobSpec)}
    assert "saves_teacher" in fields
    with pytest.raises(TypeError, match="saves_teachers"):
        JobSpec(config=BaseModel, train=print, metrics=dict, objective=("m", "max"), scores=(), saves_teachers=True)


def test_only_the_jobs_that_save_teachers_say_so():
    assert {name for name, job in JOBS.items() if job.saves_teacher} == {"lot", "teacher"}
    assert {name for name, job in JOBS.items() if job.single_process} == {"explain", "lot_rl"}


def test_the_command_line_and_the_reading_modules_import_without_torch_or_ray():
    """Jobs are imported on first use: the CLI and the readers (results, ranking, verdict, report) start without
    loading torch or Ray (seconds on every command)."""
    code = (
        "import sys\n"
        "import teachsweep.cli.app, teachsweep.results, teachsweep.ranking, teachsweep.verdict, teachsweep.report\n"
        "import teachsweep.teacher_effect, teachsweep.spec, teachsweep.preflight\n"
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
