"""Reading a run folder: the files a run writes, as one :class:`RunData`."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ReportError(ValueError):
    """A folder that cannot be reported on (not a run folder, unreadable results)."""


@dataclass(frozen=True)
class RunData:
    """What the report needs from one run folder."""

    path: Path
    name: str
    config: dict[str, Any]
    rounds: list[dict[str, Any]]
    comms: dict[str, Any]
    comms_rows: list[dict[str, str]] | None
    privacy_rows: list[dict[str, str]] | None
    # ``evaluation.json``: metrics of the centralised test set (a classifier's run writes
    # its latest; ``fedlora evaluate RUN_DIR`` rewrites it).
    evaluation: dict[str, Any] | None = None


def _read_json(path: Path) -> Any:
    """Parse a JSON file, turning any failure into a :class:`ReportError` naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"cannot read {path}: {e}") from None


def _read_csv(path: Path) -> list[dict[str, str]] | None:
    """Rows of a CSV file as dicts, or ``None`` when the file does not exist."""
    if not path.is_file():
        return None
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ReportError(f"cannot read {path}: {e}") from None


def load_run(path: str | Path, name: str | None = None) -> RunData:
    """Read a run folder; raise :class:`ReportError` when it is not one."""
    folder = Path(path)
    if not folder.is_dir():
        raise ReportError(f"'{folder}' is not a run folder: no such directory")
    metrics_path = folder / "metrics.json"
    if not metrics_path.is_file():
        raise ReportError(f"'{folder}' is not a run folder: it has no metrics.json")
    metrics = _read_json(metrics_path)
    if not isinstance(metrics, dict) or not isinstance(metrics.get("rounds"), list):
        raise ReportError(f"'{metrics_path}' is not a run's metrics.json: no 'rounds' list")
    config = metrics.get("config")
    if not isinstance(config, dict) and (folder / "config.json").is_file():
        config = _read_json(folder / "config.json")
    comms = metrics.get("comms")
    if (folder / "comms.json").is_file():
        comms = _read_json(folder / "comms.json")
    rounds = [r for r in metrics["rounds"] if isinstance(r, dict)]
    return RunData(
        path=folder,
        name=name or folder.resolve().name,
        config=config if isinstance(config, dict) else {},
        rounds=sorted(rounds, key=lambda r: _num(r.get("round")) or 0),
        comms=comms if isinstance(comms, dict) else {},
        comms_rows=_read_csv(folder / "comms.csv"),
        privacy_rows=_read_csv(folder / "privacy.csv"),
        evaluation=_read_evaluation(folder / "evaluation.json"),
    )


def _read_evaluation(path: Path) -> dict[str, Any] | None:
    """The classifier metrics in ``evaluation.json``, or None (absent, or not a classifier's)."""
    if not path.is_file():
        return None
    value = _read_json(path)
    if not isinstance(value, dict) or not isinstance(value.get("confusion_matrix"), list):
        return None
    return value


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """Folder names, with the parent prepended where two runs share a name."""
    names = [p.resolve().name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{p.resolve().parent.name}/{p.resolve().name}" for p in paths]


def load_runs(paths: Sequence[str | Path]) -> list[RunData]:
    """Read several run folders, naming them so a legend can tell them apart."""
    folders = [Path(p) for p in paths]
    for folder in folders:
        load_run(folder)  # fail on the first bad folder, before anything is drawn
    return [load_run(p, n) for p, n in zip(folders, _unique_names(folders))]


def _num(value: Any) -> float | None:
    """A finite float from a JSON or CSV value, else ``None``."""
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None
