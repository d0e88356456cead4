#!/usr/bin/env bash
# Stop the local SuperLink that `flwr run .` started for this project (found by its
# FLWR_HOME in its command line), and the simulation processes it spawned.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
pids=$(pgrep -f "flower-superlink.*$FLWR_HOME/local-superlink" || true)
[ -n "$pids" ] || { echo "fedlora: no local SuperLink running for $FLWR_HOME" >&2; exit 0; }
for pid in $pids; do
  kids=$(pgrep -P "$pid" || true)
  kill -TERM "$pid" $kids 2>/dev/null || true
done
for _ in $(seq 1 50); do
  alive=0
  for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive=1; done
  [ "$alive" = 0 ] && break
  sleep 0.2
done
for pid in $pids; do kill -KILL "$pid" 2>/dev/null || true; done
echo "fedlora: stopped local SuperLink (pid $pids)" >&2
