"""The ``custom`` task: a local model folder + local CSV/JSONL files.

The model comes from the run-config's ``model-path``, the labelled rows from
``data-path`` (per site in its node-config, or in the run-config) and
``test-data-path``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..data import TextDataset, read_table
from .registry import Task, TaskData, register_task

if TYPE_CHECKING:
    from ..run_config import RunConfig


def _load_custom(cfg: RunConfig) -> TaskData:
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
