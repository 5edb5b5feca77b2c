#!/usr/bin/env bash
# The project's test command: sets up .venv (pinned torch, deps, editable install) if needed,
# then runs the default suite (slow runs are excluded by pytest.ini; add -m slow for them).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash .ci/setup_venv.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q --durations=15 "$@"
