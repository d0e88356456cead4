# Environment for running fedlora with Flower on this machine (sourced by the scripts).
# - A project-local Flower home, so runs never touch (or reuse) another SuperLink.
# - No runtime dependency installation by the SuperLink (it would fetch a CUDA torch).
# - No telemetry, no update checks, no model hub: everything is local.
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export FLWR_HOME="${FLWR_HOME:-$REPO_ROOT/.flwr}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY=1
export RAY_USAGE_STATS_ENABLED=0
export PATH="$REPO_ROOT/${FEDLORA_VENV:-.venv}/bin:$PATH"
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
