"""What one benchmark configuration is: its pattern (ClientApp and base dtype), its
run-config, and the paths and environment every configuration shares."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# A pattern is a ClientApp and the dtype of its frozen base model: "-bf16" runs the same
# ClientApp with run-config base-dtype = "bfloat16" (adapter, gradients and optimiser stay
# float32), the others with "float32". The plain rebuild is the baseline: float32, as in
# Flower's examples.
PATTERNS = ("fedlora", "fedlora-bf16", "rebuild", "rebuild-bf16")
DEFAULT_PATTERNS = ("fedlora", "fedlora-bf16", "rebuild")
BASELINE = "rebuild"


def default_patterns(device: str = "cpu") -> tuple[str, ...]:
    """:data:`DEFAULT_PATTERNS` where ``device`` computes bfloat16 natively; elsewhere
    (a CPU without AVX512-BF16 or AMX, or ``FEDLORA_NATIVE_BF16=0``) without the ``-bf16``
    pattern, which would time an emulated precision."""
    from fedlora.models import resolve_base_dtype  # deferred: torch loads with the runs

    if resolve_base_dtype("auto", device) == "bfloat16":
        return DEFAULT_PATTERNS
    return tuple(p for p in DEFAULT_PATTERNS if not p.endswith("-bf16"))


def pattern_app(pattern: str) -> str:
    """The ClientApp of a pattern: fedlora or rebuild."""
    return pattern.split("-", 1)[0]


def pattern_overrides(pattern: str) -> dict[str, Any]:
    return {"base-dtype": "bfloat16" if pattern.endswith("-bf16") else "float32"}


DEFAULT_NODES = (10, 100, 1000)
DEFAULT_OUT = ROOT / "results" / "bench-clients"

# Quiet, offline, no telemetry: also what the simulation's worker processes inherit.
_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def bench_overrides(*, pattern: str, num_nodes: int, per_round: int, rounds: int,
                    local_steps: int, batch_size: int, dp_mode: str, partitions: int,
                    output_dir: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The run-config of one configuration (the same for both patterns but for run-name)."""
    if not 1 <= per_round <= num_nodes:
        raise ValueError(f"--per-round {per_round} must be in [1, N = {num_nodes}]")
    out = {
        "num-server-rounds": rounds,
        "fraction-train": per_round / num_nodes,
        "min-train-nodes": per_round,
        "fraction-evaluate": 0.0,
        "local-steps": local_steps,
        "batch-size": batch_size,
        "dp-mode": dp_mode,
        "num-partitions": partitions,
        "partitioner": "iid",
        "test-fraction": 0.01,
        "output-dir": output_dir,
        "run-name": f"{pattern}-dp-{dp_mode}-n{num_nodes}",
    }
    out.update(dict(extra or {}))
    out.update(pattern_overrides(pattern))
    return out
