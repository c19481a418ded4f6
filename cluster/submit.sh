#!/usr/bin/env bash
# Submit a sweep (or pipeline) to a running Ray cluster: cluster/submit.sh SPEC [RAY_ADDRESS]
#   RAY_ADDRESS defaults to $RAY_ADDRESS or http://127.0.0.1:8265 (the dashboard / job server).
#   The job's runtime environment is cluster/runtime_env.yaml: it ships this directory and installs teachsweep from
#   it on every node, so the cluster's image needs the dependencies, not the project.
#   MLFLOW_TRACKING_URI and TEACHSWEEP_CACHE, when set here, are sent to the job; when unset, nothing is sent and
#   the cluster's own values (its nodes' environment, or the spec's tracking_uri) stay in force.
#   Token authentication (Ray 2.59+): RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token) as on the head.
#   TEACHSWEEP_SUBMIT_DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
spec=${1:?usage: cluster/submit.sh SPEC [RAY_ADDRESS]}
address=${2:-${RAY_ADDRESS:-http://127.0.0.1:8265}}
cd "$(dirname "$0")/.."
[ -f "$spec" ] || { echo "error: spec file not found: $spec" >&2; exit 2; }
ray_bin=${RAY_BIN:-.venv/bin/ray}
python_bin=${PYTHON_BIN:-$(dirname "$ray_bin")/python}
[ -x "$python_bin" ] || python_bin=python3
runtime_env=$("$python_bin" - <<'PY'
import json, os, yaml
env = yaml.safe_load(open("cluster/runtime_env.yaml"))
env["env_vars"] |= {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "TEACHSWEEP_CACHE") if os.environ.get(k)}
print(json.dumps(env))
PY
)
command=("$ray_bin" job submit --address "$address" --runtime-env-json "$runtime_env"
         -- python -m teachsweep.cli run "$spec")
if [ -n "${TEACHSWEEP_SUBMIT_DRY_RUN:-}" ]; then
  printf '%s\n' "${command[@]}"
  exit 0
fi
exec "${command[@]}"
