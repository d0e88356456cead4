#!/usr/bin/env bash
# Stop the local SuperLink that `flwr run .` started for this project (found by its
# FLWR_HOME in its command line), its SuperExec and every simulation process they spawned.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
links=$(pgrep -f "flower-superlink.*$FLWR_HOME/local-superlink" || true)
[ -n "$links" ] || { echo "fedlora: no local SuperLink running for $FLWR_HOME" >&2; exit 0; }
groups=""
for pid in $links; do
  groups="$groups $(ps -o pgid= -p "$pid" | tr -d ' ')"
  for ex in $(pgrep -f "flower-superexec.*--parent-pid $pid" || true); do
    groups="$groups $(ps -o pgid= -p "$ex" | tr -d ' ')"
  done
done
for g in $groups; do [ -n "$g" ] && kill -TERM -- "-$g" 2>/dev/null; done
for _ in $(seq 1 50); do
  alive=0
  for g in $groups; do pgrep -g "$g" >/dev/null 2>&1 && alive=1; done
  [ "$alive" = 0 ] && break
  sleep 0.2
done
for g in $groups; do [ -n "$g" ] && kill -KILL -- "-$g" 2>/dev/null; done
echo "fedlora: stopped the local SuperLink (pid $(echo $links)) and its simulation processes" >&2
