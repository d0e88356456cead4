"""The project's promises about its own files: README keys, configs, layout."""

from __future__ import annotations

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


def test_library_does_not_import_the_apps():
    for py in (ROOT / "fedlora").rglob("*.py"):
        text = py.read_text()
        assert "from server" not in text and "import server" not in text, py
        assert "from client" not in text and "import client" not in text, py
    for py in (ROOT / "server").rglob("*.py"):
        assert "from client" not in py.read_text(), py
    for py in (ROOT / "client").rglob("*.py"):
        assert "from server" not in py.read_text(), py
