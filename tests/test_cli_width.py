"""The CLI in a 100-column terminal, on a small real sweep (real Ray Tune, Optuna and MLflow): every line fits, every
number is shown with its interval (no Python dict), headers are whole, and `best` names the trial the verdict names."""

import re
from pathlib import Path

import pytest
from small_jobs import lot_search_spec
from typer.testing import CliRunner

from teachsweep.cli import app

pytestmark = pytest.mark.integration
WIDTH = 100

CONFIG = '{task: digits, teacher: "cnn:8", epochs: 1, steps_per_epoch: 2, batch_size: 32, max_eval_examples: 64}'


def spec_text(results: Path) -> str:
    return lot_search_spec("cw", CONFIG, 2, 2, results) + "baseline: {budget: teacher_steps}\n"


def fits(output: str) -> list[str]:
    """The lines wider than the terminal, but for a lone word (a path or URL is printed whole, to stay copyable)."""
    return [line for line in output.splitlines() if len(line) > WIDTH and len(line.split()) > 1]


def flat(output: str) -> str:
    return " ".join(output.split())


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    assert not fits(result.output), fits(result.output)
    assert "{'" not in result.output and "…" not in result.output, result.output
    return result.output


def wrapped_by_width_only(help_text: str) -> list[str]:
    """Rows of the help's command list that end before the cell is full although their command's help goes on."""
    rows = [line.strip("│ ") and line for line in help_text.splitlines() if line.startswith("│")]
    cells = [(line[1:11].strip(), line[11:].rstrip("│ ")) for line in rows]
    width = len(rows[0]) - 11 - 2
    early = []
    for (_, text), (command, after) in zip(cells, cells[1:], strict=False):
        if not command and after.strip() and len(text) + 1 + len(after.split()[0]) <= width:
            early.append(text)
    return early


def test_every_command_fits_100_columns_and_shows_its_numbers_with_intervals(ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    monkeypatch.setenv("TEACHSWEEP_CACHE", str(tmp_path / "cache"))
    results = tmp_path / "results"
    spec_file = tmp_path / "cw.yaml"
    spec_file.write_text(spec_text(results))

    assert "ok (job lot: 1 fixed trial, 2 searched)" in flat(invoke("validate", str(spec_file)))
    help_text = invoke("--help")
    assert "the best one; a pipeline file" in flat(help_text.replace("│", " "))
    assert not wrapped_by_width_only(help_text), help_text

    ran = invoke("run", str(spec_file))
    assert re.search(r"3/3 done, 0 failed, [\d a-z]+ elapsed, ETA 0 s; best teacher/best_val_acc 0\.\d+", ran), ran
    assert re.search(r"1/3 done, 0 failed, .* elapsed, ETA \d", ran), ran
    assert "best_val_acc" in ran and "teacher/best_v\n" not in ran  # the header whole, broken after its '/'
    verdict = re.search(r"verdict best on teacher/best_val_acc .*?: trial (\S+) \[", flat(ran))
    assert verdict, ran
    trial = verdict[1]
    assert f"best trial {trial}: MLflow run " in ran
    trials_table = ran.partition("┏")[2].partition("└")[0]
    assert re.search(rf"│ {trial}\s+│", trials_table), trials_table  # its id whole in the table, never folded

    status = flat(invoke("status", "cw", "--results-dir", str(results)))
    assert "3/3 done, 0 running, 0 failed" in status, status
    assert f"FINISHED; best so far: trial {trial} [lot] " in status, status
    assert re.search(r"teacher/best_val_acc 0\.\d+ \[0\.\d+, 0\.\d+\] \(Wilson score 95% over 64 validation", status)

    best = invoke("best", "cw", "--results-dir", str(results))
    table, _, rest = best.partition("verdict")
    assert trial in table and "Wilson score 95% over 64 validation examples" in flat(table), best
    assert f"trial {trial} [" in flat(rest)

    export = invoke("export", "cw", "--results-dir", str(results))
    assert str(results / "cw" / "export" / "best_spec.yaml") in export.splitlines()[-1]  # a path is never cut
    exported = flat(export)
    picked = r"best trial \S+ \[[\w-]+\]: teacher/best_val_acc 0\.\d+ \[0\.\d+, 0\.\d+\] \(Wilson score 95%"
    assert re.search(picked, exported), exported
    assert "teacher: mlflow:" in exported

    invoke("list", "--results-dir", str(results))
    assert f"file://{results / 'cw' / 'report.html'}" in invoke("report", "cw", "--results-dir", str(results))
