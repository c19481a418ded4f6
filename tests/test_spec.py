"""Bad specs: each gives a one-line error naming the problem, exit code 2, and creates nothing."""

import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from teachsweep.cli import app
from teachsweep.spec import SpecError, parse_spec

GOOD = """
name: ok
job: lot
config: {task: digits, teacher: cnn, epochs: 1}
num_samples: 2
space:
  alpha: {type: loguniform, low: 0.05, high: 2.0}
  student_steps: {type: int, low: 1, high: 4}
"""

BAD = [
    ("malformed yaml", "name: [unclosed\njob: lot", "malformed YAML"),
    ("not a mapping", "- a\n- b", "expected a mapping"),
    ("unknown key", GOOD + "colour: blue\n", "colour: unknown key"),
    ("unknown key in config", GOOD.replace("epochs: 1", "epochs: 1, lr_typo: 3"), "config.lr_typo: unknown key"),
    ("wrong type", GOOD.replace("num_samples: 2", "num_samples: many"), "num_samples"),
    ("wrong type in config", GOOD.replace("epochs: 1", "epochs: lots"), "config.epochs"),
    ("negative range", GOOD.replace("low: 0.05", "low: -1"), "space.alpha: loguniform needs low > 0"),
    (
        "low above high",
        GOOD.replace("low: 1, high: 4", "low: 5, high: 4"),
        "space.student_steps: low (5.0) must be below",
    ),
    ("N below one", GOOD.replace("low: 1, high: 4", "low: 0, high: 4"), "space.student_steps: value 0 is invalid"),
    ("negative alpha", GOOD.replace("epochs: 1", "epochs: 1, alpha: -0.5"), "config.alpha"),
    ("empty space", GOOD.split("space:")[0], "empty search space"),
    ("unknown job", GOOD.replace("job: lot", "job: distill"), "unknown job 'distill'"),
    ("unknown task", GOOD.replace("task: digits", "task: imagenet"), "unknown task 'imagenet'"),
    ("unknown model", GOOD.replace("teacher: cnn", "teacher: alexnet"), "unknown model 'alexnet'"),
    (
        "missing csv file",
        GOOD.replace("task: digits", "task: 'csv:/no/such/file.csv'"),
        "data file not found: /no/such/file.csv",
    ),
    ("unsearchable key", GOOD + "  colour: {type: categorical, values: [red]}\n", "space.colour: not a parameter"),
    ("empty categorical", GOOD + "  temperature: {type: categorical, values: []}\n", "non-empty 'values'"),
    ("missing name", GOOD.replace("name: ok", ""), "name: required key is missing"),
    ("bad name", GOOD.replace("name: ok", "name: ../escape"), "name: use letters"),
    (
        "unknown explainer",
        "name: s\njob: scaffold\nconfig: {explainer: lime}\nspace: {beta: {type: uniform, low: 0.1, high: 1}}\n",
        "config.explainer: unknown explainer 'lime'",
    ),
    (
        "seed in config",
        GOOD.replace("epochs: 1", "epochs: 1, seed: 4"),
        "config.seed: seeds are set by the top-level 'seeds' list",
    ),
    ("model for the wrong task kind", GOOD.replace("teacher: cnn", "teacher: lstm"), "is for lm tasks"),
    ("gpu type without gpus", GOOD + "resources: {gpu_type: A100}\n", "resources: gpu_type needs gpus > 0"),
    (
        "ddp for the explain job",
        "name: e\njob: explain\nconfig: {}\nvariants: {a: {}}\nresources: {workers: 2}\n",
        "resources.workers: job 'explain' runs in one process",
    ),
    # Refused up front (before, these failed inside Ray after trials had started):
    (
        "objective the job never reports",
        GOOD + "objectives: [{metric: simulability/best_val, mode: max}]\n",
        "objectives: 'simulability/best_val' is never reported by job 'lot'",
    ),
    (
        "perplexity objective on an image task",
        GOOD + "objectives: [{metric: teacher/best_val_ppl, mode: min}]\n",
        "objectives: 'teacher/best_val_ppl' is never reported",
    ),
    (
        "objective optimised the wrong way",
        GOOD + "objectives: [{metric: teacher/best_val_acc, mode: min}]\n",
        "objectives: 'teacher/best_val_acc' is better when higher",
    ),
    ("resnet depth that does not build", GOOD.replace("teacher: cnn", "teacher: 'resnet:7'"), "must be 6n+2"),
    (
        "more MiniLM layers than it has",
        GOOD.replace("task: digits, teacher: cnn", "task: rotten_tomatoes, teacher: 'minilm:9'"),
        "all-MiniLM-L6-v2 has 6 pretrained layers",
    ),
    (
        "missing teacher checkpoint",
        "name: s\njob: scaffold\nconfig: {teacher: /no/such/teacher}\nvariants: {a: {}}\n",
        "config.teacher: no teacher checkpoint at /no/such/teacher",
    ),
    (
        "missing mlflow teacher run",
        "name: s\njob: scaffold\nconfig: {explainer: none}\nvariants: {a: {teacher: 'mlflow:0a1b2c'}}\n",
        "variants.a.teacher: MLflow run 0a1b2c not found",
    ),
    (
        "missing teacher of the explain job",
        "name: e\njob: explain\nconfig: {teacher: /no/such/dir}\nvariants: {a: {}}\n",
        "teacher: no teacher checkpoint at /no/such/dir",
    ),
    (
        "scaffold teacher without attention",
        "name: s\njob: scaffold\nconfig: {teacher: {task: digits, model: cnn}}\nvariants: {a: {}}\n",
        "teacher.model: 'cnn' has no attention",
    ),
    ("negative seed", GOOD + "seeds: [0, -1]\n", "seeds.1: Input should be greater than or equal to 0"),
    ("seed beyond 32 bits", GOOD + "seeds: [18446744073709551616]\n", "seeds.0: Input should be less than"),
    ("a control byte in the YAML", GOOD + 'note: "\x00"\n', "malformed YAML: unacceptable character #x0000"),
    (
        "negative sampler seed",
        GOOD + "sampler: {type: tpe, seed: -1}\n",
        "sampler.seed: Input should be greater than or equal to 0",
    ),
    (
        "sampler seed beyond numpy's range",
        GOOD + "sampler: {type: random, seed: 4294967296}\n",
        "sampler.seed: Input should be less than",
    ),
    (
        "scaffold on a language model",
        "name: s\njob: scaffold\nconfig: {teacher: {task: bbc_news_lm, model: 'lstm:1'}}\nvariants: {a: {}}\n",
        "teacher.task: 'bbc_news_lm' is language modelling",
    ),
    (
        "a nesting deeper than the stack",
        GOOD + "description: " + "[" * 3000 + "]" * 3000 + "\n",
        "malformed spec: nested too deeply",
    ),
    ("a key given twice", GOOD.replace("epochs: 1", "epochs: 1, epochs: 2"), "key 'epochs' given twice"),
    (
        "an int bound beyond any size",
        GOOD.replace("low: 1, high: 4", "low: 1, high: 1e300"),
        "space.student_steps: int bounds beyond any sensible size",
    ),
    (
        "an int config value beyond any size",
        GOOD.replace("epochs: 1", "epochs: 100000000000000000000000000000000"),
        "config.epochs: beyond any sensible size",
    ),
    (
        "num_samples beyond any size",
        GOOD.replace("num_samples: 2", "num_samples: 100000000000000000000000000"),
        "num_samples: Input should be less than or equal to 1000000",
    ),
    ("a seed given as a boolean", GOOD + "seeds: [true]\n", "seeds.0: Input should be a valid integer"),
    ("a results_dir with a NUL byte", GOOD + 'results_dir: "a\\0b"\n', "results_dir: not a usable directory path"),
    (
        "a pipeline's own key not finite",
        "pipeline: p\ntracking_uri: .inf\nstages:\n  - {name: a, job: lot, config: {task: digits}, variants: {a: {alpha: 0.1}}}\n",
        ": tracking_uri: not a finite number (got inf)",
    ),
    (
        "a YAML alias that contains itself",
        GOOD.replace("config: {", "config: &c {extra: [*c], "),
        "config.extra.0: a YAML alias that contains itself",
    ),
    (
        "a pipeline stage named by a list",
        "pipeline: p\nstages:\n  - {name: [a, b], job: lot, variants: {a: {alpha: 0.1}}}\n",
        "stages[0].name: required, a name (got ['a', 'b'])",
    ),
    (
        "a teacher given as a number",
        "name: s\njob: scaffold\nconfig: {teacher: 5}\nvariants: {a: {}}\n",
        "config.teacher: a teacher config (a mapping), a checkpoint directory",
    ),
    (
        "infinity spelled as a string in a teacher",
        "name: s\njob: scaffold\nconfig: {teacher: {task: digits, model: 'tiny-bert:1', lr: 'inf'}}\nvariants: {a: {}}\n",
        "config.teacher.lr: not a finite number (got inf)",
    ),
]


@pytest.mark.parametrize(("label", "text", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_spec_gives_one_line_error_and_creates_nothing(tmp_path: Path, label, text, expected):
    results = tmp_path / "results"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(text + f"\nresults_dir: {results}\n" if "results_dir" not in text else text)
    if label in ("malformed yaml", "not a mapping"):
        spec_file.write_text(text)
    outcome = CliRunner().invoke(app, ["run", str(spec_file)])
    assert outcome.exit_code == 2, outcome.output
    message = outcome.output.strip()
    assert len(message.splitlines()) == 1, message
    assert expected in message and str(spec_file) in message
    assert not results.exists()


def test_missing_csv_column_is_refused_before_anything_runs(tmp_path):
    csv = tmp_path / "reviews.csv"
    csv.write_text("review,stars\ngood,5\n")
    results = tmp_path / "results"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        GOOD.replace(
            "task: digits, teacher: cnn",
            f"task: 'csv:{csv}', teacher: tiny-bert, text_column: text, label_column: stars",
        )
        + f"results_dir: {results}\n"
    )
    outcome = CliRunner().invoke(app, ["run", str(spec_file)])
    assert (
        outcome.exit_code == 2
        and "column 'text' not in" in outcome.output
        and len(outcome.output.strip().splitlines()) == 1
    )
    assert not results.exists()


def recorded_sweep(results: Path, name: str, text: str) -> None:
    """A sweep directory as a run leaves it: the spec, and a parent run in the MLflow store beside it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    (results / name).mkdir(parents=True)
    (results / name / "spec.yaml").write_text(text)
    run = client.create_run(client.create_experiment(name), tags={"teachsweep.sweep": name})
    (results / name / "mlflow_parent_run_id").write_text(run.info.run_id)


def test_a_model_directory_named_relative_to_where_the_sweep_ran_still_reads_from_elsewhere(tmp_path, monkeypatch):
    from teachsweep.results import open_sweep

    (tmp_path / "ran-here" / "my-model").mkdir(parents=True)
    results = tmp_path / "results"
    text = GOOD.replace("teacher: cnn", "teacher: my-model") + f"results_dir: {results}\n"
    monkeypatch.chdir(tmp_path / "ran-here")
    parse_spec(text)  # where it ran, the directory is there
    recorded_sweep(results, "ok", text)
    monkeypatch.chdir(tmp_path)
    assert open_sweep("ok", results).spec.config["teacher"] == "my-model"
    with pytest.raises(SpecError, match="config.teacher: unknown model 'my-model'"):
        parse_spec(text)  # running it from here is still refused


def test_a_sweep_whose_csv_moved_away_still_reads_and_only_running_refuses_it(tmp_path):
    """Reading only reads: the data file a finished sweep trained on may move; its spec, runs and tables stay."""
    from teachsweep.results import open_sweep

    csv = tmp_path / "reviews.csv"
    results = tmp_path / "results"
    text = (
        GOOD.replace(
            "task: digits, teacher: cnn",
            f"task: 'csv:{csv}', teacher: tiny-bert, text_column: text, label_column: stars",
        )
        + f"results_dir: {results}\n"
    )
    recorded_sweep(results, "ok", text)
    assert open_sweep("ok", results).spec.config["task"] == f"csv:{csv}"  # the csv does not exist
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(text.replace("name: ok", "name: again", 1))
    outcome = CliRunner().invoke(app, ["run", str(spec_file)])
    message = outcome.output.strip()
    assert outcome.exit_code == 2 and len(message.splitlines()) == 1, message
    assert f"{spec_file}: config.task: data file not found: {csv}" in message, message
    assert not (results / "again").exists()


def test_a_moved_results_directory_reads_its_own_store_and_a_lost_store_is_one_line(tmp_path):
    """The recorded SQLite path is absolute: after a move, MLflow would create an empty store at the old path."""
    from teachsweep.results import open_sweep

    old, moved = tmp_path / "old", tmp_path / "moved"
    recorded_sweep(moved, "ok", GOOD)
    (moved / "ok" / "tracking_uri").write_text(f"sqlite:///{old}/mlflow.db\n")
    (moved / "mlflow.db").rename(tmp_path / "kept.db")
    with pytest.raises(SpecError, match="tracking store .* not found") as lost:
        open_sweep("ok", moved)
    assert len(str(lost.value).splitlines()) == 1 and "tracking_uri" in str(lost.value)
    (tmp_path / "kept.db").rename(moved / "mlflow.db")
    assert open_sweep("ok", moved).tracking_uri == f"sqlite:///{moved}/mlflow.db"
    assert not old.exists()


def test_a_spec_path_with_brackets_is_named_whole_in_the_error(tmp_path):
    """The error line is printed as plain text, not as rich markup that would eat `[v2]` or `[bold]`."""
    for name in ("lot[v2].yaml", "lot[bold].yaml"):
        spec_file = tmp_path / name
        spec_file.write_text(GOOD.replace("teacher: cnn", "teacher: alexnet") + f"results_dir: {tmp_path / 'r'}\n")
        outcome = CliRunner().invoke(app, ["validate", str(spec_file)])
        message = outcome.output.strip()
        assert outcome.exit_code == 2 and len(message.splitlines()) == 1, message
        assert f"{spec_file}: " in message and "unknown model 'alexnet'" in message, message


def test_gpu_type_becomes_rays_accelerator_resource():
    spec = parse_spec(GOOD + "resources: {gpus: 1, gpu_type: A100, workers: 2}\n")
    assert spec.resources.accelerator() == {"accelerator_type:A100": 0.001}
    assert parse_spec(GOOD).resources.accelerator() == {}


def test_good_spec_parses_with_defaults():
    spec = parse_spec(GOOD)
    assert spec.metric_names == ["teacher/best_val_acc"] and spec.mode_names == ["max"]
    assert spec.seeds == [0] and spec.resources.workers == 1


def test_missing_spec_file(tmp_path):
    outcome = CliRunner().invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert outcome.exit_code == 2 and "spec file not found" in outcome.output


def test_unreachable_tracking_uri_is_refused_before_anything_starts(tmp_path):
    results = tmp_path / "results"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(GOOD + f"tracking_uri: http://127.0.0.1:9\nresults_dir: {results}\n")
    outcome = CliRunner().invoke(app, ["run", str(spec_file)])
    assert outcome.exit_code == 2 and "unreachable" in outcome.output
    assert not results.exists()


def test_results_directory_not_writable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(GOOD + f"results_dir: {blocker / 'results'}\n")
    outcome = CliRunner().invoke(app, ["run", str(spec_file)])
    assert outcome.exit_code == 2 and "is not writable" in outcome.output


def test_spec_files_shipped_in_sweeps_all_validate():
    from teachsweep.pipeline import check_pipeline, is_pipeline, parse_pipeline
    from teachsweep.preflight import check_spec
    from teachsweep.spec import load_spec

    files = sorted(Path(__file__).parents[1].glob("sweeps/*.yaml"))
    assert files
    for file in files:
        if is_pipeline(file.read_text()):  # a pipeline validates each of its stages
            check_pipeline(parse_pipeline(file.read_text(), where=f"{file}: "), where=f"{file}: ")
        else:
            # as `validate` checks them: whether this checkout is committed is not the spec's business
            check_spec(load_spec(file), where=f"{file}: ", refuse_dirty=False)


def test_yaml_is_data_never_code():
    with pytest.raises(SpecError, match="malformed YAML"):
        parse_spec(textwrap.dedent("name: !!python/object/apply:os.system ['true']\njob: lot\n"))


def test_an_mlflow_teacher_reference_is_checked_against_the_sweeps_own_store(tmp_path):
    """The store exists but holds no such run, or a run that logged no teacher: refused, nothing created."""
    from mlflow.tracking import MlflowClient

    results = tmp_path / "results"
    results.mkdir()
    client = MlflowClient(f"sqlite:///{results}/mlflow.db")
    experiment = client.create_experiment("elsewhere", artifact_location=(tmp_path / "artifacts").as_uri())
    empty_run = client.create_run(experiment).info.run_id
    for reference, expected in ((f"mlflow:{'f' * 32}", "not found"), (f"mlflow:{empty_run}", "logged no teacher")):
        spec_file = tmp_path / "spec.yaml"
        spec_file.write_text(
            f"name: s\njob: scaffold\nconfig: {{teacher: '{reference}'}}\nvariants: {{a: {{}}}}\n"
            f"results_dir: {results}\n"
        )
        outcome = CliRunner().invoke(app, ["run", str(spec_file)])
        assert outcome.exit_code == 2 and len(outcome.output.strip().splitlines()) == 1, outcome.output
        assert "config.teacher: MLflow run" in outcome.output and expected in outcome.output
        assert not (results / "s").exists()
    assert [r.info.run_id for r in client.search_runs([experiment])] == [empty_run]  # nothing was added


NON_FINITE = [
    ("a bound too large for a float", GOOD.replace("high: 2.0", "high: 1.0e+400"), "space.alpha.high"),
    ("an infinite int bound", GOOD.replace("low: 1, high: 4", "low: 1, high: .inf"), "space.student_steps.high"),
    ("a NaN bound", GOOD.replace("high: 2.0", "high: .nan"), "space.alpha.high"),
    ("an infinite config value", GOOD.replace("epochs: 1", "epochs: 1, temperature: .inf"), "config.temperature"),
    ("a NaN config value", GOOD.replace("epochs: 1", "epochs: 1, alpha: .nan"), "config.alpha"),
    (
        "a NaN categorical value",
        GOOD + "  temperature: {type: categorical, values: [1.0, .nan]}\n",
        "space.temperature.values.1",
    ),
    (
        "an infinite value in a variant",
        "name: g\njob: lot\nconfig: {task: digits, teacher: cnn, epochs: 1}\nvariants: {hot: {temperature: .inf}}\n",
        "variants.hot.temperature",
    ),
    (
        "an infinite scheduler factor",
        GOOD + "scheduler: {type: asha, reduction_factor: .inf}\n",
        "scheduler.reduction_factor",
    ),
    ("infinite CPUs", GOOD + "resources: {cpus: .inf}\n", "resources.cpus"),
    # YAML reads these spellings as strings; pydantic would turn them into floats
    ("a bound written 1e400", GOOD.replace("high: 2.0", "high: 1e400"), "space.alpha"),
    ("an int bound written inf", GOOD.replace("low: 1, high: 4", "low: 1, high: inf"), "space.student_steps"),
    ("a config value written 1e400", GOOD.replace("epochs: 1", "epochs: 1, lr: 1e400"), "config.lr"),
    ("CPUs written inf", GOOD + "resources: {cpus: inf}\n", "resources.cpus"),
]


@pytest.mark.parametrize(("label", "text", "field"), NON_FINITE, ids=[n[0] for n in NON_FINITE])
def test_a_number_that_is_not_finite_is_refused_with_its_field_and_creates_nothing(tmp_path, label, text, field):
    """inf and NaN (`.inf`, `.nan`, or a literal beyond a float's range) are refused in validation: past it, the
    driver would create the stores and crash in Optuna's sampler, leaving a sweep that no later `run` could start."""
    results = tmp_path / "results"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(text + f"results_dir: {results}\n")
    for command in ("validate", "run"):
        outcome = CliRunner().invoke(app, [command, str(spec_file)])
        message = outcome.output.strip()
        assert outcome.exit_code == 2 and len(message.splitlines()) == 1, message
        assert f"{spec_file}: {field}: not a finite number" in message, message
    assert not results.exists()


def test_a_spec_file_that_is_not_utf8_text_is_one_line_naming_it(tmp_path):
    results = tmp_path / "results"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe" + f"results_dir: {results}\n".encode())
    for command in ("validate", "run"):
        outcome = CliRunner().invoke(app, [command, str(spec_file)])
        message = outcome.output.strip()
        assert outcome.exit_code == 2 and len(message.splitlines()) == 1, message
        assert f"{spec_file}: not UTF-8 text" in message, message
    assert not results.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_list_names_an_unreadable_sweep_and_shows_the_others(tmp_path):
    """One sweep whose saved spec is no longer readable (not UTF-8 here) does not hide the rest of the directory."""
    for name in ("good", "broken"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "spec.yaml").write_text(GOOD.replace("name: ok", f"name: {name}", 1))
    (tmp_path / "broken" / "spec.yaml").write_bytes(b"\x89PNG\r\n\x1a\n")
    outcome = CliRunner().invoke(app, ["list", "--results-dir", str(tmp_path)], env={"COLUMNS": "100"})
    assert outcome.exit_code == 0, outcome.output
    words = " ".join(outcome.output.split())
    assert "│ good │" in words and "unreadable:" in words and "not UTF-8 text" in words, outcome.output


def test_list_names_a_sweep_whose_store_lost_its_runs_and_shows_the_others(tmp_path):
    """Errors from the store itself (a parent run deleted from MLflow) are one sweep's problem, not the list's."""
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").create_experiment("orphan")
    for name in ("good", "orphan"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "spec.yaml").write_text(GOOD.replace("name: ok", f"name: {name}", 1))
    (tmp_path / "orphan" / "mlflow_parent_run_id").write_text("0123456789abcdef")
    outcome = CliRunner().invoke(app, ["list", "--results-dir", str(tmp_path)], env={"COLUMNS": "100"})
    assert outcome.exit_code == 0, outcome.output
    words = " ".join(outcome.output.split())
    assert "│ good │" in words and "MLflow run 0123456789abcdef is not in the tracking store" in words, outcome.output
    assert "orphan/mlflow_parent_run_id" in words


def test_listing_a_directory_of_sweeps_that_never_started_creates_no_store(tmp_path):
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "spec.yaml").write_text(GOOD.replace("name: ok", "name: fresh", 1))
    outcome = CliRunner().invoke(app, ["list", "--results-dir", str(tmp_path)], env={"COLUMNS": "100"})
    assert outcome.exit_code == 0 and "NOT STARTED" in outcome.output, outcome.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh"]


def test_reading_an_rl_sweep_back_needs_no_environment_installed():
    """An RL sweep read on a machine without its environment package (here: a game no package provides) reads
    back; only running it checks that gymnasium, MinAtar or ale-py can build the environment."""
    text = "name: rl\njob: lot_rl\nconfig: {task: 'gym:NoSuchGame-v0'}\nvariants: {a: {alpha: 0.5}}\n"
    assert parse_spec(text, check_files=False).config["task"] == "gym:NoSuchGame-v0"
    with pytest.raises(SpecError, match="gymnasium has no environment 'NoSuchGame-v0'"):
        parse_spec(text)


def test_reading_a_corrupt_store_is_one_line_naming_it(tmp_path):
    recorded_sweep(tmp_path, "ok", GOOD)
    (tmp_path / "mlflow.db").write_bytes(b"garbage, not a database")
    for command in ("status", "best", "report", "export"):
        outcome = CliRunner().invoke(app, [command, "ok", "--results-dir", str(tmp_path)])
        message = outcome.output.strip()
        assert outcome.exit_code == 2 and len(message.splitlines()) == 1, (command, message)
        assert f"{tmp_path / 'mlflow.db'}: not a readable MLflow store" in message
    assert (tmp_path / "mlflow.db").read_bytes() == b"garbage, not a database"


def test_report_and_ui_of_a_sweep_that_never_started_refuse_and_create_no_store(tmp_path):
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "spec.yaml").write_text(GOOD.replace("name: ok", "name: fresh", 1))
    for command in (["report", "fresh"], ["ui", "fresh", "--port", "5999"]):
        outcome = CliRunner().invoke(app, [*command, "--results-dir", str(tmp_path)])
        assert outcome.exit_code == 2 and "sweep 'fresh' has not started" in outcome.output, outcome.output
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["fresh", "spec.yaml"]


def test_a_port_that_is_not_a_number_is_one_line(tmp_path):
    outcome = CliRunner().invoke(app, ["ui", "any", "--port", "abc", "--results-dir", str(tmp_path)])
    assert outcome.exit_code == 2 and outcome.output.strip() == "error: --port: a port number, 1-65535 (got 'abc')"


def test_a_report_read_from_a_moved_results_directory_does_not_recreate_the_old_one(tmp_path):
    old, moved = tmp_path / "old", tmp_path / "moved"
    recorded_sweep(old, "ok", GOOD)
    old.rename(moved)
    outcome = CliRunner().invoke(app, ["report", "ok", "--results-dir", str(moved)], env={"COLUMNS": "200"})
    assert outcome.exit_code == 0, outcome.output
    assert (moved / "ok" / "report.html").is_file() and "not logged to MLflow" in outcome.output
    assert not old.exists()


def test_status_of_a_sweep_whose_driver_died_counts_its_running_trials_as_interrupted(tmp_path):
    from mlflow.tracking import MlflowClient

    from teachsweep.results import open_sweep, status

    recorded_sweep(tmp_path, "ok", GOOD)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = (tmp_path / "ok" / "mlflow_parent_run_id").read_text()
    experiment = client.get_run(parent).info.experiment_id
    tags = {"mlflow.parentRunId": parent, "teachsweep.role": "trial", "teachsweep.trial_id": "t1"}
    client.create_run(experiment, tags=tags)  # left RUNNING by the driver
    assert status(open_sweep("ok", tmp_path))["running"] == 1  # the driver may still be alive
    client.set_terminated(parent, "FAILED")
    st = status(open_sweep("ok", tmp_path))
    assert (st["running"], st["interrupted"], st["sweep_status"]) == (0, 1, "FAILED")
    outcome = CliRunner().invoke(app, ["status", "ok", "--results-dir", str(tmp_path)], env={"COLUMNS": "200"})
    assert "0 running, 0 failed, 1 interrupted (resume re-runs them)" in outcome.output, outcome.output


def test_list_of_a_results_directory_that_is_not_there_is_one_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    for where, said in ((tmp_path / "missing", "no results directory at"), (tmp_path / "a-file", "is not a directory")):
        outcome = CliRunner().invoke(app, ["list", "--results-dir", str(where)], env={"COLUMNS": "100"})
        assert outcome.exit_code == 2 and said in outcome.output and len(outcome.output.splitlines()) == 1, (
            outcome.output
        )
        assert not (tmp_path / "missing").exists()
