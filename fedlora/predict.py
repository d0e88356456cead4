"""Predictions and evaluation with a trained model: a run folder or an exported model.

:class:`Predictor` loads either a run folder (through :func:`fedlora.export.load_run_model`)
or a folder written by ``fedlora export`` (or any transformers classifier or causal LM
folder), and classifies texts (label and probability) or continues them.
:func:`evaluate_texts` computes the metrics of a labelled file
(:func:`fedlora.metrics.classification_metrics`), or perplexity for a causal LM.
"""

from __future__ import annotations

import dataclasses
import filecmp
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from . import pooled_model, runtime
from .data import CausalLMDataset, DataError, TextDataset, read_table, read_texts
from .export import (
    EXPORT_INFO,
    POOLED_CODE,
    ExportError,
    is_run_dir,
    load_run_model,
    run_config_of,
)
from .metrics import classification_metrics
from .training import evaluate

__all__ = ["Predictor", "Prediction", "classification_metrics", "evaluate_texts"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The most probable label of one text, its probability and every label's."""

    label: str
    probability: float
    probabilities: dict[str, float]


@dataclasses.dataclass
class Predictor:
    """A model ready to predict: classifier (``label_names`` set) or causal LM."""

    model: Any
    tokenizer: Any
    label_names: tuple[str, ...]
    causal_lm: bool
    max_length: int
    source: Path

    @classmethod
    def load(cls, path: str | Path) -> Predictor:
        """A run folder or a model folder; :class:`ExportError` names what does not fit."""
        path = Path(path)
        if not path.is_dir():
            raise ExportError(f"'{path}' is neither a run folder nor a model folder: no such "
                              "directory")
        if is_run_dir(path):
            run = load_run_model(path)
            return cls(run.model, run.tokenizer, run.label_names, run.causal_lm,
                       run.cfg.max_length, path)
        return cls._load_model_dir(path)

    @classmethod
    def _load_model_dir(cls, path: Path) -> Predictor:
        info = _read_info(path)
        adapter = (path / "adapter_config.json").is_file()
        if not adapter and not (path / "config.json").is_file():
            raise ExportError(f"'{path}' is not a model folder: no config.json or "
                              "adapter_config.json (nor a run folder: no adapter/)")
        trust = _own_code(path)
        try:
            if adapter:
                causal = bool(info.get("causal_lm", _adapter_task(path) == "CAUSAL_LM"))
            else:
                config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust)
                causal = any(a.endswith("ForCausalLM") for a in config.architectures or ())
            kwargs: dict[str, Any] = {"trust_remote_code": trust}
            labels = tuple(info.get("labels") or ())
            if causal:
                model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
            else:
                if adapter and labels:  # an adapter folder has no config of its own
                    kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)))
                model = AutoModelForSequenceClassification.from_pretrained(str(path), **kwargs)
                labels = tuple(model.config.id2label[i] for i in range(model.config.num_labels))
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust)
        except (OSError, ValueError) as e:
            raise ExportError(f"cannot load the model in '{path}': {e}") from None
        if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        max_length = int(info.get("max_length") or min(tokenizer.model_max_length, 4096))
        log.info("loaded %s from %s", "causal LM" if causal else f"classifier {labels}", path)
        return cls(model.eval(), tokenizer, () if causal else labels, causal, max_length, path)

    def _encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                              padding=True, return_tensors="pt")

    @torch.inference_mode()
    def logits(self, texts: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
        """Classifier logits, (len(texts), num_labels) float32."""
        self._need(classifier=True)
        self.model.eval()
        out = []
        for start in range(0, len(texts), batch_size):
            enc = self._encode(texts[start : start + batch_size])
            enc.pop("token_type_ids", None)  # zeros, as the run's evaluation left them
            out.append(self.model(**enc).logits.float())
        return torch.cat(out) if out else torch.zeros(0, len(self.label_names))

    def classify(self, texts: Sequence[str], *, batch_size: int = 64) -> list[Prediction]:
        """The most probable label of each text, with its probability."""
        probs = torch.softmax(self.logits(texts, batch_size=batch_size), dim=-1)
        result = []
        for row in probs.tolist():
            best = int(np.argmax(row))
            result.append(Prediction(self.label_names[best], float(row[best]),
                                     dict(zip(self.label_names, map(float, row)))))
        return result

    @torch.inference_mode()
    def generate(self, texts: Sequence[str], *, max_new_tokens: int = 40) -> list[str]:
        """The greedy continuation of each text (causal LM)."""
        self._need(classifier=False)
        self.model.eval()
        out = []
        for text in texts:  # one at a time: no left padding to get right
            enc = self.tokenizer(text, return_tensors="pt", truncation=True,
                                 max_length=self.max_length, return_token_type_ids=False)
            ids = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
            out.append(self.tokenizer.decode(ids[0, enc["input_ids"].shape[1]:],
                                             skip_special_tokens=True))
        return out

    def _need(self, *, classifier: bool) -> None:
        if classifier and self.causal_lm:
            raise ExportError(f"'{self.source}' is a causal language model, not a classifier")
        if not classifier and not self.causal_lm:
            raise ExportError(f"'{self.source}' is a classifier, not a causal language model")


def _read_info(path: Path) -> dict[str, Any]:
    try:
        info = json.loads((path / EXPORT_INFO).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read {path / EXPORT_INFO}: {e}") from None
    return info if isinstance(info, dict) else {}


def _adapter_task(path: Path) -> str | None:
    try:
        return json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get(
            "task_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ExportError(f"cannot read {path / 'adapter_config.json'}: {e}") from None


def _own_code(path: Path) -> bool:
    """Whether the folder's custom code is fedlora's own mean-pooled classifier (the only
    code run from a model folder); any other custom code is refused."""
    code = path / POOLED_CODE
    if code.is_file():
        if not filecmp.cmp(code, pooled_model.__file__, shallow=False):
            raise ExportError(f"{code} differs from fedlora's {POOLED_CODE}: not running it")
        return True
    others = sorted(p.name for p in path.glob("*.py"))
    if others:
        raise ExportError(f"'{path}' holds custom code ({', '.join(others)}) that fedlora does "
                          "not run; load it with transformers and trust_remote_code yourself")
    return False


def evaluate_texts(predictor: Predictor, texts: Sequence[str],
                   labels: Sequence[int] | None = None, *, batch_size: int = 64) -> dict[str, Any]:
    """Classifier: :func:`classification_metrics` and mean cross-entropy of ``texts`` with
    ``labels`` (indices into ``predictor.label_names``). Causal LM: token loss, next-token
    accuracy and perplexity of ``texts``, as the run's evaluation computes them."""
    if predictor.causal_lm:
        return _evaluate_lm(predictor, texts, batch_size=batch_size)
    if labels is None:
        raise ExportError("a classifier's evaluation needs labels")
    logits = predictor.logits(texts, batch_size=batch_size)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    metrics = classification_metrics(y.tolist(), logits.argmax(-1).tolist(),
                                     predictor.label_names)
    metrics["loss"] = float(torch.nn.functional.cross_entropy(logits, y)) if len(y) else None
    return metrics


def _evaluate_lm(predictor: Predictor, texts: Sequence[str], *, batch_size: int) -> dict[str, Any]:

    rows = TextDataset(list(texts), np.zeros(len(texts), dtype=np.int64), [""] * len(texts), ())
    result = evaluate(predictor.model, CausalLMDataset(rows, predictor.tokenizer,
                                                       predictor.max_length),
                      batch_size=batch_size)
    return {"examples": result.examples, "token_loss": result.loss,
            "next_token_accuracy": result.accuracy,
            "perplexity": result.perplexity if result.perplexity is not None
            else math.exp(min(result.loss, 700.0))}


def read_input_texts(path: str | Path, *, text_column: str = "text") -> list[str]:
    """The texts of ``path``: a ``.txt`` file holds one per line (blank lines skipped), a
    CSV/JSONL file one per row in ``text_column``."""
    p = Path(path)
    if p.suffix.lower() != ".txt":
        return list(read_texts(p, text_column=text_column).texts)
    try:
        lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        raise DataError(f"input file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {p}: {e}") from None
    texts = [line for line in lines if line]
    if not texts:
        raise DataError(f"{p}: the file holds no text")
    return texts


def evaluate_file(predictor: Predictor, data: str | Path | None, *, text_column: str = "text",
                  label_column: str = "label", run_dir: str | Path | None = None
                  ) -> dict[str, Any]:
    """:func:`evaluate_texts` on a labelled CSV/JSONL file (a text file for a causal LM),
    or, with ``data`` None, on the centralised test set of the run in ``run_dir`` (the
    same sample its rounds were evaluated on). A label outside the model's raises
    :class:`fedlora.data.DataError` naming the row and the label."""
    if data is None:
        if run_dir is None:
            raise ExportError("no data file given, and the model is not a run folder whose "
                              "test set could be used")
        rows = _run_test_set(Path(run_dir))
        texts, labels, source = list(rows.texts), rows.labels, "the run's test set"
    elif predictor.causal_lm:
        texts, labels, source = read_input_texts(data, text_column=text_column), None, str(data)
    else:
        rows = read_table(data, text_column=text_column, label_column=label_column,
                          label_names=predictor.label_names)
        texts, labels, source = list(rows.texts), rows.labels, str(data)
    metrics = evaluate_texts(predictor, texts, None if predictor.causal_lm else labels)
    return {"model": str(predictor.source), "data": source, **metrics}


def _run_test_set(run_dir: Path):

    cfg = runtime.resolve_config(run_config_of(run_dir))
    test = runtime.encoded_test_set(cfg)
    if test is None:
        raise ExportError(f"the task of '{run_dir}' has no centralised test set: give --data")
    return test.data
