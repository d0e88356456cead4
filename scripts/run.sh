#!/usr/bin/env bash
# Run the default federated fine-tuning with `flwr run` on a local simulation:
#   bash scripts/run.sh                                   # the default run
#   bash scripts/run.sh --run-config "num-server-rounds=2 lora-rank=4"
# Environment: FEDLORA_NUM_SUPERNODES (default 20 virtual clients),
# FEDLORA_CPUS_PER_CLIENT (default 1), FEDLORA_KEEP_SUPERLINK=1 to leave the local
# SuperLink running afterwards (the next run then starts faster).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh

NUM="${FEDLORA_NUM_SUPERNODES:-20}"
CPUS="${FEDLORA_CPUS_PER_CLIENT:-1}"
already_running=0
if pgrep -f "flower-superlink.*$FLWR_HOME/local-superlink" >/dev/null 2>&1; then already_running=1; fi

cleanup() {
  if [ "${FEDLORA_KEEP_SUPERLINK:-0}" != "1" ] && [ "$already_running" = "0" ]; then
    bash scripts/stop-superlink.sh || true
  fi
}
trap cleanup EXIT INT TERM

# Results go to ./results unless the run-config says otherwise (a TOML file given with
# --run-config cannot be combined with other overrides, so then its output-dir is used as is).
extra=(--run-config "output-dir='$PWD/results'")
for arg in "$@"; do
  case "$arg" in *.toml|*output-dir=*) extra=() ;; esac
done
flwr run . --stream \
  --federation-config "num-supernodes=$NUM client-resources-num-cpus=$CPUS" \
  "${extra[@]}" "$@"
