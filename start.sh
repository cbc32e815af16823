#!/usr/bin/env bash
# Start the FramePack web app.
#   bash start.sh            real models (downloaded from Hugging Face on first start, ~30 GB)
#   bash start.sh --tiny     small random models built locally; no download, runs on a CPU
# Any other argument is passed to demo_gradio.py (see `python demo_gradio.py --help`).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
exec "$PYTHON" demo_gradio.py "$@"
