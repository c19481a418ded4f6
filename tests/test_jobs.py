"""The job protocol: every job declares itself with one typed JobSpec, and a misspelt declaration is an error."""

import dataclasses
import importlib

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
