"""Text-classification data: reading local tables, splitting, partitioning, batching.

Everything here is pure Python/NumPy over a :class:`TextDataset` (parallel lists of
texts, integer labels and group names); tokenisation happens once per process in
:class:`EncodedDataset`.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError

__all__ = [
    "DataError",
    "TextDataset",
    "EncodedDataset",
    "CausalLMDataset",
    "read_table",
    "read_texts",
    "split_by_group",
    "split_stratified",
    "split_within_groups",
    "partition_natural",
    "partition_iid",
    "partition_dirichlet",
    "partition",
    "train_val_split",
]

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data file cannot be used: missing, empty, wrong columns or unknown labels."""


@dataclass(frozen=True)
class TextDataset:
    """Parallel arrays: ``texts[i]`` has label ``labels[i]`` and belongs to ``groups[i]``."""

    texts: list[str]
    labels: np.ndarray  # (n,) int64
    groups: list[str]
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int] | np.ndarray) -> TextDataset:
        idx = np.asarray(indices, dtype=np.int64)
        return TextDataset(
            texts=[self.texts[i] for i in idx],
            labels=self.labels[idx],
            groups=[self.groups[i] for i in idx],
            label_names=self.label_names,
        )


def _read_rows(path: Path) -> list[dict[str, object]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}: line {lineno} is not a JSON object")
                rows.append(row)
        return rows
    if suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    raise DataError(f"{path}: unsupported file type '{suffix}' (use .csv, .tsv or .jsonl)")


def read_table(
    path: str | Path,
    *,
    text_column: str,
    label_column: str,
    label_names: Sequence[str],
    group_column: str | None = None,
    skip_bad_rows: bool = False,
) -> TextDataset:
    """Read a local CSV/TSV/JSONL file of (text, label) rows, validating everything.

    Labels are matched as strings against ``label_names`` (so ``0``/``1`` and
    ``negative``/``positive`` both work). Raises :class:`DataError` naming the file,
    the column or the row at fault. With ``skip_bad_rows`` (a site under DP) a row with an
    empty text or an unknown label is left out instead (counted in the local log) and a
    file with no usable row gives an empty dataset: whether a site refuses must not answer
    a question about its rows, and a per-row filter keeps one row's effect to that row.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    rows = _read_rows(p)
    if not rows and skip_bad_rows:
        return TextDataset([], np.zeros(0, dtype=np.int64), [], tuple(label_names))
    if not rows:
        raise DataError(f"{p}: the file holds no rows")
    for column in (text_column, label_column):
        if column not in rows[0]:
            raise DataError(
                f"{p}: no column '{column}' (columns: {', '.join(map(str, rows[0]))}); "
                "set text-column / label-column"
            )
    lookup = {name: i for i, name in enumerate(label_names)}
    texts, labels, groups, skipped = [], [], [], 0
    for i, row in enumerate(rows, start=1):
        text, label = row.get(text_column), row.get(label_column)
        key = str(label).strip() if label is not None else ""
        if skip_bad_rows and (text is None or not str(text).strip() or key not in lookup):
            skipped += 1
            continue
        if text is None or not str(text).strip():
            raise DataError(f"{p}: row {i} has an empty '{text_column}'")
        if key not in lookup:
            raise DataError(
                f"{p}: row {i} has unknown label {label!r} in '{label_column}' "
                f"(known labels: {', '.join(label_names)})"
            )
        texts.append(str(text))
        labels.append(lookup[key])
        groups.append(str(row.get(group_column, "")) if group_column else "")
    if skipped:  # the site's own log only
        log.warning("%s: left out %d of %d rows (empty text or a label outside %s)", p,
                    skipped, len(rows), ", ".join(label_names))
    return TextDataset(texts, np.asarray(labels, dtype=np.int64), groups, tuple(label_names))


def read_texts(path: str | Path, *, text_column: str, skip_bad_rows: bool = False
               ) -> TextDataset:
    """Read a local file of unlabelled texts for a causal language model.

    A ``.txt`` file holds one example per paragraph (blocks separated by blank lines, so a
    speech or a note keeps its line breaks); a CSV/TSV/JSONL file one example per row, in
    ``text_column``. Raises :class:`DataError` naming the file, the column or the row at
    fault; with ``skip_bad_rows`` (under DP, see :func:`read_table`) empty rows are left out
    and no text at all gives an empty dataset.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    if p.suffix.lower() == ".txt":
        try:
            raw = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        texts = [b.strip() for b in re.split(r"\n\s*\n", raw) if b.strip()]
        if not texts and not skip_bad_rows:
            raise DataError(f"{p}: the file holds no text")
    else:
        rows = _read_rows(p)
        if not rows and not skip_bad_rows:
            raise DataError(f"{p}: the file holds no rows")
        if rows and text_column not in rows[0]:
            raise DataError(f"{p}: no column '{text_column}' (columns: "
                            f"{', '.join(map(str, rows[0]))}); set text-column")
        texts = []
        for i, row in enumerate(rows, start=1):
            text = row.get(text_column)
            if skip_bad_rows and (text is None or not str(text).strip()):
                continue
            if text is None or not str(text).strip():
                raise DataError(f"{p}: row {i} has an empty '{text_column}'")
            texts.append(str(text))
    return TextDataset(texts, np.zeros(len(texts), dtype=np.int64), [""] * len(texts), ())


def split_by_group(
    groups: Sequence[str], test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out whole groups (e.g. movies) for a test set: returns (train_idx, test_idx)."""
    names = sorted(set(groups))
    rng = np.random.default_rng(seed)
    rng.shuffle(names)
    n_test = max(1, round(len(names) * test_fraction))
    test_names = set(names[:n_test])
    is_test = np.fromiter((g in test_names for g in groups), dtype=bool, count=len(groups))
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def split_stratified(
    labels: Sequence[int] | np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``test_fraction`` of each label's examples (at least one per label):
    returns (train_idx, test_idx), for data without groups to hold out whole."""
    y = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test.append(idx[: max(1, round(len(idx) * test_fraction))])
    is_test = np.zeros(len(y), dtype=bool)
    if test:
        is_test[np.concatenate(test)] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def split_within_groups(
    groups: Sequence[str], test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``test_fraction`` of every group's examples (at least one, never all of a
    group with two or more): returns (train_idx, test_idx). Every group keeps training
    data, as when each group is one client (LEAF's per-user split)."""
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(groups), dtype=bool)
    for name in sorted(by_group):
        idx = rng.permutation(by_group[name])
        n_test = min(max(1, round(len(idx) * test_fraction)), max(1, len(idx) - 1))
        is_test[idx[:n_test]] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def partition_natural(
    groups: Sequence[str], num_partitions: int, seed: int
) -> list[np.ndarray]:
    """One partition per bundle of whole groups (natural non-IID), sizes balanced greedily.

    Groups are shuffled with ``seed`` then each goes to the currently smallest
    partition, so every partition holds whole groups and roughly equal counts.
    """
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    names = sorted(by_group)
    if len(names) < num_partitions:
        raise DataError(
            f"cannot split {len(names)} groups into {num_partitions} natural partitions; "
            "lower num-partitions or use partitioner = 'iid'"
        )
    rng = np.random.default_rng(seed)
    rng.shuffle(names)
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    for name in names:
        smallest = min(range(num_partitions), key=lambda k: len(parts[k]))
        parts[smallest].extend(by_group[name])
    return [np.asarray(sorted(p), dtype=np.int64) for p in parts]


def partition_iid(n: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Shuffle ``n`` indices with ``seed`` and deal them into equal partitions."""
    if n < num_partitions:
        raise DataError(f"cannot split {n} examples into {num_partitions} partitions")
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, num_partitions)]


DIRICHLET_REDRAWS = 10  # draws tried before empty partitions are filled deterministically


def partition_dirichlet(
    labels: Sequence[int] | np.ndarray, num_partitions: int, *, alpha: float, seed: int
) -> list[np.ndarray]:
    """Label-skewed partitions: each label's examples are shared out in Dirichlet(alpha)
    proportions.

    For every label (in sorted order) the generator seeded with ``seed`` shuffles that
    label's examples and draws the shares of the ``num_partitions`` partitions from
    Dirichlet(alpha, ..., alpha); so each partition's label mix is skewed, strongly for
    small ``alpha`` (few labels per partition) and barely for large ``alpha`` (close to
    the global mix). Every index lands in exactly one partition.

    No partition is left empty: if a draw leaves one empty, the whole draw is repeated
    (up to ``DIRICHLET_REDRAWS`` times, from the same generator, so still reproducible);
    if every draw leaves one empty, each empty partition in turn takes one example from
    the currently largest partition (the last index of that partition's most common
    label), which changes the draw as little as possible.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not (
        np.isfinite(alpha) and alpha > 0
    ):
        raise ConfigError("dirichlet-alpha", alpha, "a float > 0")
    y = np.asarray(labels, dtype=np.int64)
    n = len(y)
    if n < num_partitions:
        raise DataError(f"cannot split {n} examples into {num_partitions} partitions")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    parts: list[list[int]] = []
    for _ in range(DIRICHLET_REDRAWS):
        parts = [[] for _ in range(num_partitions)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            shares = rng.dirichlet(np.full(num_partitions, float(alpha)))
            cuts = np.floor(np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if all(parts):
            break
    else:
        empty = [k for k, p in enumerate(parts) if not p]
        log.info("Dirichlet draws left %d of %d partitions empty after %d tries; "
                 "moving one example into each from the largest", len(empty),
                 num_partitions, DIRICHLET_REDRAWS)
        for k in empty:
            donor = max(range(num_partitions), key=lambda j: (len(parts[j]), -j))
            donor_labels = y[parts[donor]]
            common = int(np.bincount(donor_labels).argmax())
            pos = max(i for i, lab in enumerate(donor_labels) if lab == common)
            parts[k].append(parts[donor].pop(pos))
    return [np.asarray(sorted(p), dtype=np.int64) for p in parts]


PARTITIONERS = ("natural", "iid", "dirichlet")


def partition(
    data: TextDataset, num_partitions: int, *, method: str, seed: int, alpha: float = 0.5
) -> list[np.ndarray]:
    """Partition ``data`` with the named partitioner (``natural``, ``iid`` or ``dirichlet``;
    ``alpha`` is the Dirichlet concentration of ``dirichlet``)."""
    if method == "natural":
        return partition_natural(data.groups, num_partitions, seed)
    if method == "iid":
        return partition_iid(len(data), num_partitions, seed)
    if method == "dirichlet":
        return partition_dirichlet(data.labels, num_partitions, alpha=alpha, seed=seed)
    raise ValueError(f"unknown partitioner {method!r} (known: {', '.join(PARTITIONERS)})")


def train_val_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A client's local split of its ``n`` examples into (train_idx, val_idx)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction)) if n >= 5 else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class EncodedDataset:
    """A :class:`TextDataset` tokenised once; batches are padded to their own longest row."""

    def __init__(self, data: TextDataset, tokenizer, max_length: int) -> None:
        # Never past the model's own positions (a crash on one row would be a bit about it).
        limit = getattr(tokenizer, "model_max_length", None)
        if isinstance(limit, int) and 0 < limit < 1_000_000:
            max_length = min(max_length, limit)
        texts = list(data.texts)
        enc = tokenizer(texts, truncation=True, max_length=max_length) if texts else {}
        self.input_ids: list[list[int]] = enc.get("input_ids", [])
        self.labels = torch.as_tensor(data.labels, dtype=torch.long)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.max_length = max_length  # no row is longer (the model's own limit applied)
        self.data = data

    def __len__(self) -> int:
        return len(self.input_ids)

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = [self.input_ids[i] for i in indices]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (batch, width)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.as_tensor(r, dtype=torch.long)
            mask[j, : len(r)] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": self.labels[torch.as_tensor(list(indices), dtype=torch.long)],
        }

    def batches(
        self, indices: Sequence[int] | np.ndarray, batch_size: int, *, by_length: bool = True
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches over ``indices`` (for evaluation), grouped by length to pad little."""
        idx = list(np.asarray(indices).tolist())
        if by_length:
            idx.sort(key=lambda i: len(self.input_ids[i]))
        for start in range(0, len(idx), batch_size):
            yield self.collate(idx[start : start + batch_size])


class CausalLMDataset(EncodedDataset):
    """Texts for next-token prediction: a batch's labels are its input ids, with padding
    set to -100 so that the loss (transformers' shifted cross-entropy) skips it."""

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = super().collate(indices)
        ids, mask = batch["input_ids"], batch["attention_mask"]  # (batch, width)
        batch["labels"] = ids.masked_fill(mask == 0, -100)
        return batch
