"""Using what a run trained: `fedlora export`, `predict` and `evaluate`.

Unit tests build a run folder by hand (run-config, a random adapter on a tiny random model);
``test_export_real.py`` exports short real runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.cli import main
from fedlora.models import LoraSpec, build_lora_model
from fedlora.predict import Predictor, classification_metrics
from fedlora.results import save_adapter, write_json
from fedlora.runtime import parse_run_config

from .conftest import write_reviews
from .test_shakespeare import make_tiny_llama

TEXTS = ["the film was great and moving", "dull boring awful", "a clumsy but charming story",
         "superb", "the film was bland and messy and tedious beyond words"]


def make_run(run_dir: Path, model_dir: Path, *, pooling: str = "model", causal: bool = False,
             seed: int = 0) -> Path:
    """A finished run folder: its run-config, metrics.json and a random trained adapter."""
    overrides = ({"task": "shakespeare", "model-path": str(model_dir),
                  "lora-target-modules": "q_proj,v_proj"} if causal else
                 {"task": "custom", "model-path": str(model_dir), "labels": "negative,positive",
                  "head-pooling": pooling})
    cfg = parse_run_config({**overrides, "lora-rank": 4, "lora-alpha": 16.0, "max-length": 16})
    spec = LoraSpec(str(model_dir), 0 if causal else 2, 4, 16.0, 0.0, tuple(cfg.target_modules),
                    not causal, causal_lm=causal, pooling=pooling)
    model = build_lora_model(spec)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # LoRA factors and head: a visible, non-zero update
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
    save_adapter(model, run_dir / "adapter")
    write_json(run_dir / "config.json", cfg.to_dict())
    write_json(run_dir / "metrics.json", {"config": cfg.to_dict(), "rounds": [{"round": 0}]})
    return run_dir


@pytest.fixture()
def run_dir(tmp_path, tiny_model_dir) -> Path:
    return make_run(tmp_path / "run", tiny_model_dir)


@pytest.fixture()
def mean_run_dir(tmp_path, tiny_model_dir) -> Path:
    return make_run(tmp_path / "mean-run", tiny_model_dir, pooling="mean")


def _logits(model, tok, texts, max_length=16) -> torch.Tensor:
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.float()


@pytest.mark.parametrize("pooling", ["model", "mean"])
def test_merged_export_loads_with_transformers_and_predicts_as_the_run(tmp_path, tiny_model_dir,
                                                                       pooling):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    run = make_run(tmp_path / "run", tiny_model_dir, pooling=pooling)
    expected = Predictor.load(run).logits(TEXTS)
    out = tmp_path / "merged"
    assert main(["export", str(run), str(out), "--merged"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    trust = pooling == "mean"  # the mean-pooled head is local code in the folder
    model = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=trust).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert tok.model_max_length == 16  # the run's max-length: truncation=True cuts the same
    got = _logits(model, tok, TEXTS)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    pipe = pipeline("text-classification", model=str(out), trust_remote_code=trust)
    labels = [r["label"] for r in pipe(TEXTS, truncation=True)]
    assert labels == [["negative", "positive"][i] for i in expected.argmax(-1).tolist()]
    assert json.loads((out / "fedlora.json").read_text())["pooling"] == pooling


def test_merge_folds_in_the_alpha_over_r_scale(run_dir, tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    assert main(["export", str(run_dir), str(tmp_path / "m"), "--merged"]) == 0
    merged = load_file(tmp_path / "m" / "model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    lora = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    name = "bert.encoder.layer.0.attention.self.query"
    a = lora[f"base_model.model.{name}.lora_A.weight"]
    b = lora[f"base_model.model.{name}.lora_B.weight"]
    torch.testing.assert_close(merged[f"{name}.weight"],
                               base[f"{name}.weight"] + 16.0 / 4 * b @ a)


def test_adapter_export_names_its_local_base(run_dir, tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "adapter"
    assert main(["export", str(run_dir), str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())
    model = AutoModelForSequenceClassification.from_pretrained(
        out, id2label={0: "negative", 1: "positive"}).eval()
    got = _logits(model, AutoTokenizer.from_pretrained(out), TEXTS)
    torch.testing.assert_close(got, Predictor.load(run_dir).logits(TEXTS), rtol=1e-4, atol=1e-5)
    assert Predictor.load(out).label_names == ("negative", "positive")


def test_predict_prints_a_label_per_text_and_json(run_dir, tmp_path, capsys):
    texts = tmp_path / "in.txt"
    texts.write_text("\n".join(TEXTS[:3]) + "\n\n")
    assert main(["predict", str(run_dir), "--file", str(texts)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    expected = Predictor.load(run_dir).classify(TEXTS[:3])
    for line, p in zip(lines, expected):
        label, prob = line.split("\t")
        assert label == p.label and float(prob) == pytest.approx(p.probability, abs=1e-4)
    assert main(["predict", str(run_dir), "--text", TEXTS[0], "--text", TEXTS[1], "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == TEXTS[:2]
    assert all(set(r["probabilities"]) == {"negative", "positive"} for r in rows)
    assert rows[0]["label"] == expected[0].label


def test_evaluation_counts_the_confusion_matrix_in_its_one_pass(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from fedlora.data import EncodedDataset, read_table
    from fedlora.training import evaluate

    rows = read_table(write_reviews(tmp_path / "t.csv", 37, seed=5), text_column="text",
                      label_column="label", label_names=["negative", "positive"])
    data = EncodedDataset(rows, AutoTokenizer.from_pretrained(tiny_model_dir), 16)
    model = build_lora_model(LoraSpec(str(tiny_model_dir), 2, 4, 16.0, 0.0, ("query", "value"),
                                      True))
    res = evaluate(model, data, batch_size=8)  # five batches, the last one short
    assert sum(map(sum, res.confusion)) == res.examples == 37
    assert (res.confusion[0][0] + res.confusion[1][1]) / 37 == pytest.approx(res.accuracy)
    model.eval()  # evaluate() leaves it in train mode
    with torch.no_grad():
        preds = torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits
                           for b in data.batches(np.arange(37), 8)]).argmax(-1)
    assert [list(r) for r in res.confusion] == classification_metrics(
        rows.labels.tolist(), preds.tolist(), rows.label_names)["confusion_matrix"]


def test_classification_metrics_by_hand():
    m = classification_metrics([0, 0, 0, 1, 1, 2], [0, 1, 0, 1, 0, 1], ["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [0, 1, 0]]
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["per_class"]["a"] == {"precision": 2 / 3, "recall": 2 / 3, "f1": pytest.approx(2 / 3),
                                   "support": 3}
    assert m["per_class"]["b"]["precision"] == pytest.approx(1 / 3)
    assert m["per_class"]["b"]["recall"] == pytest.approx(1 / 2)
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_evaluate_a_labelled_file(run_dir, tmp_path, capsys, fmt):
    data = write_reviews(tmp_path / f"eval.{fmt}", 12, seed=3, fmt=fmt)
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(run_dir), "--data", str(data), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "confusion matrix" in printed and "precision" in printed
    m = json.loads(out.read_text())
    predictor = Predictor.load(run_dir)
    rows = [json.loads(x) for x in data.read_text().splitlines()] if fmt == "jsonl" else None
    texts = [r["text"] for r in rows] if rows else None
    if texts is None:
        import csv
        with data.open() as f:
            rows = list(csv.DictReader(f))
        texts = [r["text"] for r in rows]
    truth = [["negative", "positive"].index(r["label"]) for r in rows]
    preds = predictor.logits(texts).argmax(-1).tolist()
    assert m["examples"] == 12 and m["labels"] == ["negative", "positive"]
    assert m["accuracy"] == pytest.approx(np.mean(np.array(preds) == np.array(truth)))
    assert np.sum(m["confusion_matrix"]) == 12
    assert m["confusion_matrix"] == classification_metrics(truth, preds, m["labels"])[
        "confusion_matrix"]


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_a_run_without_adapter_is_refused_and_nothing_is_written(run_dir, tmp_path, capsys):
    import shutil

    shutil.rmtree(run_dir / "adapter")
    out = tmp_path / "out"
    for argv in (["export", str(run_dir), str(out), "--merged"],
                 ["predict", str(run_dir), "--text", "x"],
                 ["evaluate", str(run_dir)]):
        assert main(argv) == 2
        assert "has no trained adapter" in _error(capsys)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_unknown_label_in_the_file_names_row_and_label(run_dir, tmp_path, capsys):
    data = tmp_path / "bad.csv"
    data.write_text("text,label\ngood,positive\nmeh,neutral\n")
    assert main(["evaluate", str(run_dir), "--data", str(data), "-o",
                 str(tmp_path / "e.json")]) == 2
    err = _error(capsys)
    assert "row 2" in err and "'neutral'" in err and str(data) in err
    assert not (tmp_path / "e.json").exists()
    assert main(["evaluate", str(run_dir), "--data", str(data), "--label-column", "y"]) == 2
    assert "no column 'y'" in _error(capsys)


def test_unwritable_or_occupied_output_folder(run_dir, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert main(["export", str(run_dir), str(a_file / "out"), "--merged"]) == 2
    assert str(a_file / "out") in _error(capsys)
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):
            return  # a user who can write anywhere (root): the file case above stands in
        assert main(["export", str(run_dir), str(locked / "out"), "--merged"]) == 2
        err = _error(capsys)
        assert str(locked / "out") in err and "cannot write" in err
        assert list(locked.iterdir()) == []
    finally:
        os.chmod(locked, 0o700)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert main(["export", str(run_dir), str(taken)]) == 2
    assert "already exists and is not empty" in _error(capsys)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]


def test_a_model_of_another_task_is_refused(run_dir, tmp_path, capsys):
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    config["task_type"] = "CAUSAL_LM"
    (run_dir / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    assert main(["export", str(run_dir), str(tmp_path / "o"), "--merged"]) == 2
    assert "a model of another task" in _error(capsys)
    assert not (tmp_path / "o").exists()


def test_a_head_of_another_size_is_refused(mean_run_dir, capsys):
    config = json.loads((mean_run_dir / "config.json").read_text())
    config["labels"] = "negative,neutral,positive"
    (mean_run_dir / "config.json").write_text(json.dumps(config))
    assert main(["predict", str(mean_run_dir), "--text", "x"]) == 2
    err = _error(capsys)
    assert "classifier" in err and "(2,)" in err and "(3,)" in err


def test_mean_pooled_head_needs_merged_and_code_is_checked(mean_run_dir, tmp_path, capsys):
    assert main(["export", str(mean_run_dir), str(tmp_path / "a")]) == 2
    assert "--merged" in _error(capsys)
    out = tmp_path / "m"
    assert main(["export", str(mean_run_dir), str(out), "--merged"]) == 0
    capsys.readouterr()
    assert main(["predict", str(out), "--text", "superb"]) == 0
    assert capsys.readouterr().out.split("\t")[0] in ("negative", "positive")
    (out / "pooled_model.py").write_text((out / "pooled_model.py").read_text() + "\n# edited\n")
    assert main(["predict", str(out), "--text", "superb"]) == 2
    assert "differs from fedlora's pooled_model.py" in _error(capsys)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def test_causal_lm_export_predict_and_perplexity(tmp_path, tiny_llama, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = make_run(tmp_path / "lm-run", tiny_llama, causal=True)
    predictor = Predictor.load(run)
    texts = ["to be or not to be", "that is the question"]
    enc = AutoTokenizer.from_pretrained(tiny_llama)(texts[0], return_tensors="pt",
                                                    return_token_type_ids=False)
    with torch.no_grad():
        expected = predictor.model(**enc).logits
    for merged in (True, False):
        out = tmp_path / f"lm-{merged}"
        assert main(["export", str(run), str(out)] + (["--merged"] if merged else [])) == 0
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(**enc).logits, expected, rtol=1e-4, atol=1e-4)
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "lm-True"), "--text", texts[0], "--json",
                 "--max-new-tokens", "3"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["text"] == texts[0] and isinstance(row["generated"], str)
    data = tmp_path / "lines.txt"
    data.write_text("\n\n".join(texts) + "\n")
    for model_dir in (run, tmp_path / "lm-True"):
        assert main(["evaluate", str(model_dir), "--data", str(data), "-o",
                     str(tmp_path / "ppl.json")]) == 0
        assert "perplexity" in capsys.readouterr().out
        m = json.loads((tmp_path / "ppl.json").read_text())
        assert m["examples"] == 2 and m["perplexity"] == pytest.approx(
            np.exp(m["token_loss"]), rel=1e-6)
    assert main(["predict", str(run), "--file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in _error(capsys)


def test_report_shows_the_confusion_matrix_of_an_evaluation(tmp_path):
    from .test_report import make_run as make_report_run
    from .test_report import parse_page

    run = make_report_run(tmp_path, "r")
    assert main(["report", str(run)]) == 0
    assert "fedlora evaluate" in " ".join(parse_page(run / "report.html").text)
    m = classification_metrics([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], ["rotten", "fresh"])
    write_json(run / "evaluation.json", m)
    assert main(["report", str(run)]) == 0
    text = " ".join(parse_page(run / "report.html").text)
    assert "Confusion matrix" in text and "5 examples" in text and "0.6000" in text
