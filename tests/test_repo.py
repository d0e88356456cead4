"""The project's promises about its own files: README keys, configs, layout."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from fedlora.config import KEYS, parse_run_config

ROOT = Path(__file__).resolve().parents[1]


def test_readme_documents_every_run_config_key():
    readme = (ROOT / "README.md").read_text()
    missing = [k.name for k in KEYS if f"`{k.name}`" not in readme]
    assert not missing


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_config_overlays_are_valid(path):
    parse_run_config(tomllib.loads(path.read_text()))


def _imports(folder: str, package: str) -> list[Path]:
    pattern = re.compile(rf"^\s*(from|import)\s+{package}\b", re.MULTILINE)
    return [p for p in (ROOT / folder).rglob("*.py") if pattern.search(p.read_text())]


def test_layering_library_and_apps():
    assert not _imports("fedlora", "server") and not _imports("fedlora", "client")
    assert not _imports("server", "client") and not _imports("client", "server")
