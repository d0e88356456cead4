"""A per-user cache of models converted once from packaged files (e.g. a GGUF file).

Converting is slow (de-quantising a GGUF model takes tens of seconds) and every
simulation worker needs the model, so the result is saved once as a transformers
folder (safetensors) under :func:`cache_root` and read from there afterwards.

A folder is written atomically: it is built in a temporary sibling folder and renamed
into place, so a crash never leaves a half-written cache. Concurrent processes (Ray
workers starting together) serialise on a lock file: one converts, the others wait and
then read its result.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["cache_root", "cached_folder", "convert_gguf"]

log = logging.getLogger(__name__)

SOURCE_FILE = "fedlora-source.json"  # what a cached folder was built from


def cache_root() -> Path:
    """The cache folder: ``$FEDLORA_CACHE``, else ``$XDG_CACHE_HOME/fedlora``, else
    ``~/.cache/fedlora``."""
    explicit = os.environ.get("FEDLORA_CACHE", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fedlora"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (waits for other holders)."""
    try:  # deferred: POSIX only
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: the atomic rename still protects
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _read_source(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(folder: Path, source: Mapping[str, Any], required: tuple[str, ...]) -> bool:
    return all((folder / name).is_file() for name in required) and _read_source(folder) == dict(source)


def cached_folder(
    name: str,
    source: Mapping[str, Any],
    build: Callable[[Path], None],
    *,
    required: tuple[str, ...] = ("config.json",),
    root: Path | None = None,
) -> Path:
    """The cache folder ``name``, built with ``build(folder)`` if it is missing or stale.

    ``source`` (JSON-able) describes what the folder is built from; a folder made from
    another source (say a newer package) is rebuilt. ``required`` are files a finished
    folder holds. ``build`` writes into a fresh temporary folder that is renamed to
    ``root/name`` only once it has returned, under a lock shared by all processes.
    """
    root = cache_root() if root is None else Path(root)
    target = root / name
    if _is_complete(target, source, required):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{name}.lock"):
        if _is_complete(target, source, required):  # built by another process meanwhile
            return target
        # Nobody else converts while we hold the lock: leftovers are from crashed runs.
        for stale in root.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished folder is plain
        try:
            t0 = time.perf_counter()
            build(tmp)
            (tmp / SOURCE_FILE).write_text(json.dumps(dict(source), indent=1, sort_keys=True))
            missing = [f for f in required if not (tmp / f).is_file()]
            if missing:
                raise RuntimeError(f"building the cache folder {name!r} wrote no {missing}")
            if target.exists():  # stale (another source, or damaged by hand): replace it
                trash = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-old-", dir=root))
                os.rename(target, trash / name)
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(tmp, target)
            log.info("cached %s in %s (built in %.1f s)", name, target, time.perf_counter() - t0)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantise a GGUF causal LM (and its tokenizer) into a transformers folder ``out``.

    transformers dequantises GGUF weights to float32 on load; the model then still
    claims its GGUF quantisation, which ``save_pretrained`` refuses, so that claim is
    dropped first: what is saved is a plain float32 model.
    """
    # deferred: transformers is heavy and only a GGUF conversion needs it here
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    gguf_path = Path(gguf_path)
    folder, file = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=file, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, local_files_only=True)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
