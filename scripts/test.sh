#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, slow end-to-end runs included:
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh -m "not slow"   # unit tests and cheap in-process checks (no simulations)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
# Tests start their own SuperLinks with private FLWR_HOMEs and stop them by PID.
unset FLWR_HOME
exec python -m pytest -ra --durations=20 "$@"
