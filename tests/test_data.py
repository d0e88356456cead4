"""Reading local data files, splitting and partitioning."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.data import (
    DataError,
    partition_iid,
    partition_natural,
    read_table,
    split_by_group,
)
from fedlora.tasks import RT_LABELS, _rotten_tomatoes_rows, load_task_data
from fedlora.config import parse_run_config

from .conftest import write_reviews

LABELS = ("negative", "positive")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_read_table_reads_text_and_labels(tmp_path, fmt):
    path = write_reviews(tmp_path / f"r.{fmt}", 10, fmt=fmt)
    data = read_table(path, text_column="text", label_column="label", label_names=LABELS,
                      group_column="site")
    assert len(data) == 10 and data.labels.tolist() == [1, 0] * 5
    assert data.groups[:3] == ["s0", "s1", "s2"]


def test_read_table_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_table(tmp_path / "none.csv", text_column="text", label_column="label",
                   label_names=LABELS)
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    with pytest.raises(DataError, match="no rows"):
        read_table(empty, text_column="text", label_column="label", label_names=LABELS)
    path = write_reviews(tmp_path / "r.csv", 4)
    with pytest.raises(DataError, match="no column 'sentence'"):
        read_table(path, text_column="sentence", label_column="label", label_names=LABELS)
    with pytest.raises(DataError, match=r"row 1 has unknown label 'positive'"):
        read_table(path, text_column="text", label_column="label", label_names=("0", "1"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok", "label": "positive"}\nnot json\n')
    with pytest.raises(DataError, match="line 2"):
        read_table(bad, text_column="text", label_column="label", label_names=LABELS)


def test_natural_partitions_keep_groups_whole_and_cover_everything():
    rng = np.random.default_rng(0)
    groups = [f"m{int(g)}" for g in rng.integers(0, 40, size=500)]
    parts = partition_natural(groups, 7, seed=3)
    all_idx = np.concatenate(parts)
    assert sorted(all_idx.tolist()) == list(range(500))
    owner = {}
    for k, p in enumerate(parts):
        for i in p:
            assert owner.setdefault(groups[i], k) == k
    assert partition_natural(groups, 7, seed=3)[0].tolist() == parts[0].tolist()
    with pytest.raises(DataError, match="groups"):
        partition_natural(groups, 100, seed=0)


def test_iid_partitions_are_disjoint_and_balanced():
    parts = partition_iid(103, 10, seed=1)
    assert sorted(np.concatenate(parts).tolist()) == list(range(103))
    assert {len(p) for p in parts} <= {10, 11}


def test_rotten_tomatoes_holds_out_whole_movies():
    rows = _rotten_tomatoes_rows()
    assert len(rows) == 12808 and rows.label_names == RT_LABELS
    assert int(rows.labels.sum()) == 7403  # fresh
    cfg = parse_run_config({})
    data = load_task_data(cfg)
    assert not set(data.train.groups) & set(data.test.groups)
    assert len(data.train) + len(data.test) == len(rows)
    train_idx, test_idx = split_by_group(rows.groups, 0.08, 0)
    assert len(test_idx) == len(data.test)
