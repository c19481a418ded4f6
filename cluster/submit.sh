#!/usr/bin/env bash
# Submit a sweep to a running Ray cluster: cluster/submit.sh SPEC [RAY_ADDRESS]
#   RAY_ADDRESS defaults to $RAY_ADDRESS or http://127.0.0.1:8265 (the dashboard / job server).
#   MLFLOW_TRACKING_URI should name a tracking server the workers can reach.
#   Token authentication (Ray 2.59+): RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token) as on the head.
set -euo pipefail
spec=${1:?usage: cluster/submit.sh SPEC [RAY_ADDRESS]}
address=${2:-${RAY_ADDRESS:-http://127.0.0.1:8265}}
cd "$(dirname "$0")/.."
[ -f "$spec" ] || { echo "error: spec file not found: $spec" >&2; exit 2; }
ray_bin=${RAY_BIN:-.venv/bin/ray}
exec "$ray_bin" job submit --address "$address" --working-dir . \
  --runtime-env-json "{\"env_vars\": {\"MLFLOW_TRACKING_URI\": \"${MLFLOW_TRACKING_URI:-}\", \"RAY_USAGE_STATS_ENABLED\": \"0\"}, \"excludes\": [\".venv\", \"teachsweep-results\", \".git\"]}" \
  -- python -m teachsweep.cli run "$spec"
