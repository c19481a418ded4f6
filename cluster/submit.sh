#!/usr/bin/env bash
# Submit a sweep to a running Ray cluster: cluster/submit.sh SPEC [RAY_ADDRESS]
#   RAY_ADDRESS defaults to $RAY_ADDRESS or http://127.0.0.1:8265 (the dashboard / job server).
#   MLFLOW_TRACKING_URI, when set here, names the tracking server for the job; when unset, nothing is sent and the
#   cluster's own value (its nodes' environment, or the spec's tracking_uri) stays in force.
#   Token authentication (Ray 2.59+): RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token) as on the head.
#   TEACHSWEEP_SUBMIT_DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
spec=${1:?usage: cluster/submit.sh SPEC [RAY_ADDRESS]}
address=${2:-${RAY_ADDRESS:-http://127.0.0.1:8265}}
cd "$(dirname "$0")/.."
[ -f "$spec" ] || { echo "error: spec file not found: $spec" >&2; exit 2; }
ray_bin=${RAY_BIN:-.venv/bin/ray}
env_vars="\"RAY_USAGE_STATS_ENABLED\": \"0\""
if [ -n "${MLFLOW_TRACKING_URI:-}" ]; then
  env_vars="$env_vars, \"MLFLOW_TRACKING_URI\": \"$MLFLOW_TRACKING_URI\""
fi
runtime_env="{\"env_vars\": {$env_vars}, \"excludes\": [\".venv\", \"teachsweep-results\", \".git\", \".gpu\"]}"
command=("$ray_bin" job submit --address "$address" --working-dir . --runtime-env-json "$runtime_env"
         -- python -m teachsweep.cli run "$spec")
if [ -n "${TEACHSWEEP_SUBMIT_DRY_RUN:-}" ]; then
  printf '%s\n' "${command[@]}"
  exit 0
fi
exec "${command[@]}"
