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
# Two pytest-xdist workers (FEDLORA_TEST_WORKERS to change; 0 runs in this process): many
# slow tests mostly wait (for processes to start, a heartbeat to miss, a straggler's
# timeout), and the other worker uses that time. A test module's tests run in one worker
# (--dist loadfile): the `flwr run` tests, which share the local SuperLink's fixed ports,
# live in one module (and take a lock besides).
WORKERS="${FEDLORA_TEST_WORKERS:-2}"
if [ "$WORKERS" = "0" ]; then
  exec python -m pytest -ra --durations=20 "$@"
fi
exec python -m pytest -ra --durations=20 -n "$WORKERS" --dist loadfile "$@"
