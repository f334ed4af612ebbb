#!/usr/bin/env bash
# The test command of README: the default suite (slow, benchmark and docker tests excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
export MLFLOW_DISABLE_TELEMETRY=true
exec python3 -m pytest -q "$@"
