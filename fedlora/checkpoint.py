"""The server's checkpoint: everything a run needs to continue after its last finished round.

One file, ``<run_dir>/checkpoint.npz``, written atomically after every round (a temporary
file, fsync, rename): readers see the previous round's checkpoint or this one, never half.
It holds the global adapter as the server keeps it, the aggregator's own state (the
stacked update of ``stack``, the residuals of ``svd`` with error feedback), the sampling
RNG, and the rows of the metrics, communication and privacy ledgers, plus the run-config
it was made under. A SHA-256 of the arrays guards against a damaged file.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .adapters import state_digest
from .config import defaults
from .results import atomic_write_bytes

__all__ = ["CHECKPOINT_FILE", "Checkpoint", "CheckpointError", "save_checkpoint",
           "load_checkpoint", "find_resumable", "RESUMABLE_CHANGES"]

CHECKPOINT_FILE = "checkpoint.npz"
FORMAT_VERSION = 1
_META = "__meta__"

# Run-config keys that may differ between a run and its resumption. Everything else
# (model, data, aggregator, privacy, seed, ...) must match the checkpoint.
RESUMABLE_CHANGES = frozenset({
    "resume", "round-timeout", "output-dir", "run-name", "client-num-threads",
    "eval-batch-size", "evaluate-every", "fraction-evaluate", "max-update-norm",
    "max-num-examples", "foreign-keys", "num-server-rounds",
})


class CheckpointError(ValueError):
    """No usable checkpoint: missing, damaged, or made for another configuration."""


@dataclass
class Checkpoint:
    """The state of a run after ``round`` finished rounds."""

    round: int
    config: dict[str, Any]
    global_state: dict[str, np.ndarray]
    method_state: dict[str, np.ndarray] = field(default_factory=dict)
    wire_state: dict[str, np.ndarray] = field(default_factory=dict)  # broadcast residuals
    rng_state: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    comms_rows: list[dict[str, Any]] = field(default_factory=list)
    privacy_rows: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> Path:
    """Write ``run_dir/checkpoint.npz`` atomically; returns its path."""
    run_dir = Path(run_dir)
    arrays: dict[str, np.ndarray] = {}
    for prefix, part in (("global/", ckpt.global_state), ("method/", ckpt.method_state),
                         ("wire/", ckpt.wire_state)):
        for k, v in part.items():
            arrays[prefix + k] = np.asarray(v)
    meta = {
        "version": FORMAT_VERSION, "round": int(ckpt.round), "config": ckpt.config,
        "rng_state": ckpt.rng_state, "rows": ckpt.rows, "comms_rows": ckpt.comms_rows,
        "privacy_rows": ckpt.privacy_rows, "extra": ckpt.extra,
        "sha256": state_digest(arrays).hex(),
    }
    meta_bytes = json.dumps(meta, default=_json_default).encode()
    buf = io.BytesIO()
    np.savez(buf, **arrays, **{_META: np.frombuffer(meta_bytes, dtype=np.uint8)})
    path = run_dir / CHECKPOINT_FILE
    atomic_write_bytes(path, buf.getvalue())
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read ``run_dir/checkpoint.npz``; :class:`CheckpointError` if missing or damaged."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        meta = json.loads(data.pop(_META).tobytes().decode())
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('version')!r}, "
                              f"this fedlora reads version {FORMAT_VERSION}")
    if state_digest(data).hex() != meta.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is damaged (its arrays do not match their "
                              "checksum)")
    glob = {k[len("global/"):]: v for k, v in data.items() if k.startswith("global/")}
    method = {k[len("method/"):]: v for k, v in data.items() if k.startswith("method/")}
    wire = {k[len("wire/"):]: v for k, v in data.items() if k.startswith("wire/")}
    return Checkpoint(round=int(meta["round"]), config=meta["config"], global_state=glob,
                      method_state=method, wire_state=wire, rng_state=meta.get("rng_state") or {},
                      rows=meta.get("rows") or [], comms_rows=meta.get("comms_rows") or [],
                      privacy_rows=meta.get("privacy_rows") or [],
                      extra=meta.get("extra") or {})


def find_resumable(output_dir: str | Path, run_name: str) -> Path:
    """The run folder to resume: ``output_dir/run_name``, or with an empty name the most
    recently checkpointed run in ``output_dir``."""
    base = Path(output_dir).expanduser().resolve()
    if run_name:
        run_dir = base / run_name
        if not (run_dir / CHECKPOINT_FILE).is_file():
            raise CheckpointError(f"no checkpoint to resume in {run_dir} "
                                  f"({CHECKPOINT_FILE} is written after every finished round)")
        return run_dir
    found = sorted(base.glob(f"*/{CHECKPOINT_FILE}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise CheckpointError(f"no run with a checkpoint in {base} to resume")
    return found[-1].parent


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ and may not (see :data:`RESUMABLE_CHANGES`). A key the
    saved config lacks (a checkpoint from before the key existed) ran at its default."""
    known = defaults()
    keys = (set(saved) | set(current)) - RESUMABLE_CHANGES
    return sorted(k for k in keys
                  if saved.get(k, known.get(k)) != current.get(k, known.get(k)))
