"""The project's promises about its own files: documented keys, configs, layout."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from fedlora.config import KEYS, parse_run_config

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_doc_lists_every_run_config_key():
    # The run-config reference is the key table of docs/configuration.md: one row per key.
    text = (ROOT / "docs" / "configuration.md").read_text()
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| `[^`]*` \|", text, re.MULTILINE)
    names = [k.name for k in KEYS]
    assert not [n for n in names if n not in rows], "keys missing from the table"
    assert not [r for r in rows if r not in names], "rows for keys that do not exist"
    assert len(rows) == len(set(rows)), "a key listed twice"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_config_overlays_are_valid(path):
    parse_run_config(tomllib.loads(path.read_text()))


def _imports(folder: str, package: str) -> list[Path]:
    pattern = re.compile(rf"^\s*(from|import)\s+{package}\b", re.MULTILINE)
    return [p for p in (ROOT / folder).rglob("*.py") if pattern.search(p.read_text())]


def test_layering_library_and_apps():
    assert not _imports("fedlora", "server") and not _imports("fedlora", "client")
    assert not _imports("server", "client") and not _imports("client", "server")
