#!/usr/bin/env bash
# Install edgeface and run the main job: the default config (LFW View 1, 4 edge nodes,
# identity partition) on the LFW copy beside the repository, or on $EDGEFACE_DATA.
set -euo pipefail
cd "$(dirname "$0")/.."

export MLFLOW_DISABLE_TELEMETRY=true
python3 -m pip install --quiet --disable-pip-version-check -e .

data="${EDGEFACE_DATA:-../shared/data/lfw}"
if [ ! -d "$data" ]; then
    echo "LFW not found at $data: run 'edgeface data fetch lfw --dest data/lfw' and" \
         "set EDGEFACE_DATA=data/lfw" >&2
    exit 2
fi
out="${1:-runs/lfw-$(date +%Y%m%d-%H%M%S)}"
exec edgeface run --data "$data" --out "$out"
