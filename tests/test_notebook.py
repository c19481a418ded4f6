"""The analysis notebook runs top to bottom (nbclient, a real kernel) against a sweep made here."""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from small_jobs import lot_search_spec

from teachsweep.spec import parse_spec
from teachsweep.sweep import run_sweep

pytestmark = pytest.mark.integration
NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "analyze_sweep.ipynb"

CONFIG = '{task: digits, teacher: "cnn:8", epochs: 2, steps_per_epoch: 3, batch_size: 32, max_eval_examples: 64}'


def spec_text(results: Path) -> str:
    return lot_search_spec("nb", CONFIG, 3, 3, results) + "baseline: {budget: teacher_steps}\n"


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(
        not cell.get("outputs") and not cell.get("execution_count")
        for cell in notebook.cells
        if cell.cell_type == "code"
    )


def test_analysis_notebook_executes_against_a_real_sweep(ray_session, tmp_path, monkeypatch):
    text = spec_text(tmp_path / "results")
    run_sweep(parse_spec(text), text)
    monkeypatch.setenv("TEACHSWEEP_SWEEP", "nb")
    monkeypatch.setenv("TEACHSWEEP_RESULTS_DIR", str(tmp_path / "results"))
    (tmp_path / "results" / "nb" / "optuna.db").unlink()  # a study file moved away: the notebook only reads
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "results").rglob("*"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "results").rglob("*")) == before
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text_out = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "sweep nb: job lot, 4 trial runs" in text_out
    picked = re.search(r"best on teacher/best_val_acc .*?: trial (\w+)", text_out).group(1)
    assert f"single objective: the best trial is {picked}" in text_out  # the verdict's rule, not a raw idxmax
    assert (
        "best on teacher/best_val_acc (max; picked on the validation split): trial" in text_out
        and "vs teacher_only: " in text_out
    )  # the verdict
    # the objective against alpha and against N, the alpha x N map, parallel coordinates, learning curves
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 5
    captions = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "alpha in four log-spaced bins" in captions and "per epoch of the 3 best trials" in captions
    assert captions.count("Each point is one searched trial (3), its final teacher/best_val_acc") == 2, captions
    trials = next(o["data"]["text/html"] for o in outputs if "<table" in o.get("data", {}).get("text/html", ""))
    header = trials.split("</thead>")[0]
    assert "<th>teacher/best_val_acc</th>" in header and "<th>...</th>" not in header, header  # no column hidden
    assert "TqdmWarning" not in text_out and "IProgress" not in text_out  # stdout and stderr both


def test_the_notebook_on_a_sweep_that_never_started_says_so_and_creates_no_store(tmp_path, monkeypatch):
    from nbclient.exceptions import CellExecutionError

    results = tmp_path / "results"
    (results / "nb").mkdir(parents=True)
    (results / "nb" / "spec.yaml").write_text(spec_text(results))
    monkeypatch.setenv("TEACHSWEEP_SWEEP", "nb")
    monkeypatch.setenv("TEACHSWEEP_RESULTS_DIR", str(results))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    with pytest.raises(CellExecutionError, match="sweep nb has not started"):
        client.execute()
    assert sorted(p.name for p in results.rglob("*")) == ["nb", "spec.yaml"]
