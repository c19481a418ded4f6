"""A chained study's table by the teacher's arm, written from the students' sweep to committed result rows, and
the README's markdown table printed from those rows (so the table cannot drift from its data).

    python scripts/teacher_effect_tables.py lot-simulability-students [--results-dir teachsweep-results] \
        [--out docs/results/lot_simulability.json] [--from-json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any

from teachsweep.jobs import JOBS
from teachsweep.layout import DEFAULT_RESULTS
from teachsweep.results import open_sweep
from teachsweep.teacher_effect import teacher_effect

SIMULABILITY = "simulability/test"


def code_version() -> dict[str, Any]:
    """The commit the rows were read with, and whether the tree was dirty."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def cell(row: dict[str, Any] | None, paired: bool, seeds: int) -> str:
    """A mean or paired difference with its interval; fewer seeds than the row's others are named (n=...)."""
    if row is None or (paired and "vs_reference_diff_mean" not in row):
        return "–"
    n = row["vs_reference_n_seeds"] if paired else row["n_seeds"]
    fewer = f" (n={n})" if n < seeds else ""
    if n == 0:
        return "–"
    if n < 2:
        value = f"{row['vs_reference_diff_mean']:+.3f}" if paired else f"{row['mean']:.3f}"
        return f"{value}{fewer}, no interval"
    if paired:
        return (
            f"{row['vs_reference_diff_mean']:+.3f} [{row['vs_reference_ci_low']:+.3f}, "
            f"{row['vs_reference_ci_high']:+.3f}] p {row['vs_reference_p_value']:.2g}{fewer}"
        )
    return f"{row['mean']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]{fewer}"


def markdown(rows: list[dict[str, Any]], teacher_metric: str) -> str:
    teachers = list(dict.fromkeys(r["teacher"] for r in rows))
    variants = [v for v in dict.fromkeys(r["variant"] for r in rows) if v]
    index = {(r["teacher"], r["variant"], r["metric"]): r for r in rows}
    seeds = max(r["n_seeds"] for r in rows)
    header = [f"teacher ({seeds} seeds)", "teacher test acc"] + [f"simulability, {v}" for v in variants]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for teacher in teachers:
        cells = [index.get((teacher, "", teacher_metric))] + [index.get((teacher, v, SIMULABILITY)) for v in variants]
        lines.append(f"| {teacher} | " + " | ".join(cell(c, False, seeds) for c in cells) + " |")
        if any(c is not None and "vs_reference_diff_mean" in c for c in cells):
            lines.append("| Δ vs baseline teacher | " + " | ".join(cell(c, True, seeds) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("students")
    parser.add_argument("--results-dir", default=DEFAULT_RESULTS)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--from-json", action="store_true", help="print the table from --out without reading a sweep")
    args = parser.parse_args()
    if not args.from_json:
        students = open_sweep(args.students, args.results_dir)
        chained = teacher_effect(students)
        if chained is None:
            raise SystemExit(f"{args.students}: no trial took its teacher from an earlier sweep")
        teachers, rows = chained
        teacher_job = JOBS[open_sweep(teachers, args.results_dir).spec.job]
        record = {
            "teachers": teachers,
            "students": args.students,
            "teacher_metric": teacher_job.saved_teacher_scores[0],
            "code": code_version(),
            "method": "mean with Student-t 95% over teacher seeds; Δ: paired Student-t 95% by teacher seed, "
            "exact sign-flip permutation p",
            "rows": rows,
        }
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    record = json.loads(args.out.read_text())
    print(markdown(record["rows"], record["teacher_metric"]))


if __name__ == "__main__":
    main()
