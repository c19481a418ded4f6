#!/usr/bin/env bash
# Submit a sweep (or pipeline) to a running Ray cluster: cluster/submit.sh [--results-dir DIR] SPEC [RAY_ADDRESS]
#   SPEC: a spec file inside this repository, by a path relative to the current directory or absolute; it is
#   shipped with the repository (cluster/runtime_env.yaml) and named on the cluster by its path in the repository.
#   A spec outside the repository is refused: it would not be shipped.
#   RAY_ADDRESS defaults to $RAY_ADDRESS or http://127.0.0.1:8265 (the dashboard / job server).
#   TEACHSWEEP_RESULTS_DIR (default /shared/teachsweep-results) is the results directory of specs that set no
#   results_dir; it must be on storage every node mounts. --results-dir DIR replaces the spec's results_dir.
#   MLFLOW_TRACKING_URI and TEACHSWEEP_CACHE, when set here, are sent to the job; when unset, nothing is sent and
#   the cluster's own values (its nodes' environment, or the spec's tracking_uri) stay in force.
#   Token authentication (Ray 2.59+): RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token) as on the head.
#   TEACHSWEEP_SUBMIT_DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
results_dir=
if [ "${1:-}" = --results-dir ]; then
  results_dir=${2:?--results-dir needs a directory}
  shift 2
fi
spec=${1:?usage: cluster/submit.sh [--results-dir DIR] SPEC [RAY_ADDRESS]}
address=${2:-${RAY_ADDRESS:-http://127.0.0.1:8265}}
[ -f "$spec" ] || { echo "error: spec file not found: $spec" >&2; exit 2; }
spec_abs=$(cd "$(dirname "$spec")" && pwd -P)/$(basename "$spec")
root=$(cd "$(dirname "$0")/.." && pwd -P)
case "$spec_abs" in
  "$root"/*) spec_in_repo=${spec_abs#"$root"/} ;;
  *) echo "error: $spec is outside the repository $root, so it would not be shipped: copy it under sweeps/" >&2
     exit 2 ;;
esac
cd "$root"
ray_bin=${RAY_BIN:-.venv/bin/ray}
python_bin=${PYTHON_BIN:-$(dirname "$ray_bin")/python}
[ -x "$python_bin" ] || python_bin=python3
export TEACHSWEEP_RESULTS_DIR=${TEACHSWEEP_RESULTS_DIR:-/shared/teachsweep-results}
runtime_env=$("$python_bin" - <<'PY'
import json, os, yaml
env = yaml.safe_load(open("cluster/runtime_env.yaml"))
sent = ("MLFLOW_TRACKING_URI", "TEACHSWEEP_CACHE", "TEACHSWEEP_RESULTS_DIR")
env["env_vars"] |= {k: os.environ[k] for k in sent if os.environ.get(k)}
print(json.dumps(env))
PY
)
run=(python -m teachsweep.cli run "$spec_in_repo")
[ -z "$results_dir" ] || run+=(--results-dir "$results_dir")
command=("$ray_bin" job submit --address "$address" --runtime-env-json "$runtime_env" -- "${run[@]}")
if [ -n "${TEACHSWEEP_SUBMIT_DRY_RUN:-}" ]; then
  printf '%s\n' "${command[@]}"
  exit 0
fi
exec "${command[@]}"
