"""The HTML report of run folders: `fedlora report RUN_DIR [RUN_DIR ...] [-o OUT.html]`."""

from __future__ import annotations

import base64
import csv
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fedlora.cli import main
from fedlora.report import audit_reply_keys, load_run
from tests.test_simulation import run_in_process

ROOT = Path(__file__).resolve().parents[1]
NODES = (3021147760345528694, 5812987618740679959)
FACTOR_KEYS = [
    f"base_model.model.bert.encoder.layer.{i}.attention.self.{m}.lora_{f}.weight"
    for i in range(2) for m in ("query", "value") for f in "AB"
]
HEAD_KEYS = ["base_model.model.classifier.bias", "base_model.model.classifier.weight"]
COMMS_COLUMNS = ["round", "node", "direction", "kind", "bytes", "analytic_bytes", "factor_bytes",
                 "head_bytes", "num_arrays", "wire_dtype", "keys"]
PRIVACY_COLUMNS = ["round", "node", "mode", "noise_multiplier", "sample_rate", "steps",
                   "epsilon", "delta"]
MSG_BYTES = 4096


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _comms_rows(rounds: int, extra_up_key: str | None) -> list[dict]:
    rows = []
    for rnd in range(1, rounds + 1):
        for node in NODES:
            for direction in ("down", "up"):
                keys = FACTOR_KEYS + HEAD_KEYS
                if direction == "up" and extra_up_key and rnd == rounds:
                    keys = keys + [extra_up_key]
                rows.append({"round": rnd, "node": node, "direction": direction, "kind": "train",
                             "bytes": MSG_BYTES, "analytic_bytes": MSG_BYTES,
                             "factor_bytes": MSG_BYTES - 8, "head_bytes": 8,
                             "num_arrays": len(keys), "wire_dtype": "float32",
                             "keys": ";".join(sorted(keys))})
    return rows


def make_run(parent: Path, name: str, rounds: int = 2, *, dp: bool = False,
             extra_up_key: str | None = None) -> Path:
    """A fake run folder with the files (and formats) the server writes."""
    run = parent / name
    (run / "adapter").mkdir(parents=True)
    config = {"task": "custom", "num-server-rounds": rounds, "aggregator": "fedavg",
              "lora-rank": 4, "wire-dtype": "float32", "run-name": name}
    if dp:
        config["dp-mode"] = "local"
    per_round = MSG_BYTES * len(NODES)  # one message per client each way
    rows = [{"round": 0, "test_loss": 0.69, "test_accuracy": 0.5, "elapsed_seconds": 1.0}]
    for rnd in range(1, rounds + 1):
        rows.append({"round": rnd, "train_loss": 0.6, "test_loss": 0.6 - rnd / 20,
                     "test_accuracy": 0.5 + rnd / 10, "fed_eval_loss": None,
                     "fed_eval_accuracy": None, "clients_sampled": 2, "clients_accepted": 2,
                     "clients_refused": 0, "refused": [], "bytes_up": per_round,
                     "bytes_down": per_round, "round_seconds": 1.5,
                     "elapsed_seconds": 1.0 + 1.5 * rnd})
    comms = {
        "total_bytes": {"up": per_round * rounds, "down": per_round * rounds},
        "messages": 4 * rounds, "bytes_per_client_update": MSG_BYTES,
        "full_model_bytes": 1_000_000, "ratio_update_to_full_model": MSG_BYTES / 1_000_000,
        "measured_equals_analytic": True,
        "per_round": {str(r): {"up": per_round, "down": per_round} for r in range(1, rounds + 1)},
        "per_node": {str(n): {"up": MSG_BYTES * rounds, "down": MSG_BYTES * rounds}
                     for n in NODES},
    }
    (run / "metrics.json").write_text(json.dumps({"config": config, "rounds": rows,
                                                  "comms": comms}))
    (run / "comms.json").write_text(json.dumps(comms))
    (run / "config.json").write_text(json.dumps(config))
    _write_csv(run / "metrics.csv", ["round", "test_accuracy"],
               [{"round": r["round"], "test_accuracy": r["test_accuracy"]} for r in rows])
    _write_csv(run / "comms.csv", COMMS_COLUMNS, _comms_rows(rounds, extra_up_key))
    if dp:
        _write_csv(run / "privacy.csv", PRIVACY_COLUMNS, [
            {"round": r, "node": n, "mode": "local", "noise_multiplier": 1.1,
             "sample_rate": 0.1, "steps": 3 * r, "epsilon": 0.4 * r + i * 0.1, "delta": 1e-5}
            for r in range(1, rounds + 1) for i, n in enumerate(NODES)])
    return run


class _Page(HTMLParser):
    """Collects the src of every <img> and the text of the page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs).get("src") or "")

    def handle_data(self, data):
        self.text.append(data)


def parse_page(path: Path) -> _Page:
    """Parse the page; check every image is an embedded, valid PNG."""
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    prefix = "data:image/png;base64,"
    for src in page.images:
        assert src.startswith(prefix), src[:60]
        assert base64.b64decode(src[len(prefix):], validate=True).startswith(b"\x89PNG\r\n\x1a\n")
    return page


def test_single_run_report_default_path(tmp_path, capsys):
    run = make_run(tmp_path, "run-a")
    assert main(["report", str(run)]) == 0
    out = run / "report.html"
    assert capsys.readouterr().out.strip() == str(out)
    page = parse_page(out)
    assert len(page.images) == 3  # cumulative bytes, bytes per client, accuracy vs bytes
    text = " ".join(page.text)
    assert "run-a" in text and "DP was off" in text
    assert "Every array key in the 4 client replies" in text
    assert "0.7000" in text  # final test accuracy
    assert "16,384 B" in text  # total bytes up: 2 rounds x 2 clients x 4096


def test_privacy_csv_adds_epsilon_plot(tmp_path):
    run = make_run(tmp_path, "run-dp", rounds=3, dp=True)
    out = tmp_path / "sub" / "dp.html"
    assert main(["report", str(run), "-o", str(out)]) == 0
    page = parse_page(out)
    assert len(page.images) == 4
    text = " ".join(page.text)
    assert "DP was off" not in text and "dp-mode" in text
    assert "1.300" in text  # max epsilon: round 3, second node


def test_comparison_page_mentions_both_runs(tmp_path, monkeypatch, capsys):
    a, b = make_run(tmp_path, "run-a"), make_run(tmp_path, "run-b", rounds=3, dp=True)
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(a), str(b)]) == 0
    out = tmp_path / "fedlora-comparison.html"
    assert capsys.readouterr().out.strip() == "fedlora-comparison.html"
    page = parse_page(out)
    assert len(page.images) == 4  # the epsilon plot, since one run has privacy.csv
    text = " ".join(page.text)
    assert "run-a" in text and "run-b" in text
    assert "DP was off (no privacy.csv) in: run-a" in text
    assert out.read_text().count("<tbody><tr>") == 1 and out.read_text().count("<tr><th>run-") == 2


def test_same_folder_names_are_told_apart(tmp_path):
    a, b = make_run(tmp_path / "x", "tiny"), make_run(tmp_path / "y", "tiny")
    out = tmp_path / "cmp.html"
    assert main(["report", str(a), str(b), "-o", str(out)]) == 0
    text = " ".join(parse_page(out).text)
    assert "x/tiny" in text and "y/tiny" in text


@pytest.mark.parametrize("kind", ["empty", "missing", "file", "bad-json"])
def test_bad_input_exits_2_with_one_line(tmp_path, kind):
    target = tmp_path / f"not-a-run-{kind}"
    if kind == "empty":
        target.mkdir()
        (target / "comms.json").write_text("{}")
    elif kind == "file":
        target.write_text("x")
    elif kind == "bad-json":
        target.mkdir()
        (target / "metrics.json").write_text("{not json")
    good = make_run(tmp_path, "good")
    proc = subprocess.run([sys.executable, "-m", "fedlora.cli", "report", str(good), str(target)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and target.name in lines[0] and "Traceback" not in proc.stderr
    assert not (ROOT / "fedlora-comparison.html").exists()


def test_audit_names_a_non_factor_key(tmp_path):
    bad_key = "base_model.model.bert.embeddings.word_embeddings.weight"
    run = make_run(tmp_path, "leaky", extra_up_key=bad_key)
    assert main(["report", str(run)]) == 0
    html_text = (run / "report.html").read_text()
    audit = html_text.split("Audit of client replies", 1)[1].split("<h2>", 1)[0]
    assert bad_key in audit and "neither LoRA factors nor head keys" in audit
    assert "in 2 replies" in audit  # both nodes, last round


def test_audit_ignores_server_messages_and_accepts_heads():
    rows = [
        {"round": "1", "node": "7", "direction": "down", "keys": "w.embeddings.weight"},
        {"round": "1", "node": "7", "direction": "up",
         "keys": "a.query.lora_A.weight;a.query.lora_B.weight;base_model.model.score.weight;"
                 "base_model.model.classification_head.out_proj.bias"},
        {"round": "1", "node": "8", "direction": "up", "keys": ""},
        {"round": "2", "node": "8", "direction": "up", "keys": "a.query.weight"},
    ]
    assert audit_reply_keys(rows) == {"a.query.weight": [("2", "8")]}


def test_text_is_escaped(tmp_path):
    run = make_run(tmp_path, "r<b>&x")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["config"]["aggregator"] = "<script>alert(1)</script>"
    metrics["rounds"][1]["refused"] = [{"node": 5, "reason": "bad <shape> & value"}]
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert main(["report", str(run)]) == 0
    html_text = (run / "report.html").read_text()
    assert "<script>" not in html_text and "&lt;script&gt;" in html_text
    assert "r&lt;b&gt;&amp;x" in html_text and "bad &lt;shape&gt; &amp; value" in html_text


def test_missing_optional_files_and_nulls(tmp_path):
    run = make_run(tmp_path, "sparse")
    (run / "comms.csv").unlink()
    (run / "comms.json").unlink()
    metrics = json.loads((run / "metrics.json").read_text())
    for r in metrics["rounds"]:
        r["test_accuracy"] = None
    metrics.pop("comms")
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert load_run(run).comms == {}
    assert main(["report", str(run)]) == 0
    page = parse_page(run / "report.html")
    assert len(page.images) == 3
    assert "cannot be audited" in " ".join(page.text)


@pytest.mark.slow
def test_report_of_a_real_run(custom_task, capsys):
    """The run's own report shows the confusion matrix of its last centralised evaluation
    (collected in the same pass as its accuracy); ``fedlora evaluate RUN_DIR`` agrees."""
    overrides = dict(custom_task, **{"local-steps": 1, "fraction-evaluate": 0.0})
    run_in_process(overrides, num_nodes=4)
    run = Path(custom_task["output-dir"]) / "tiny"
    rounds = json.loads((run / "metrics.json").read_text())["rounds"]
    final = rounds[-1]["test_accuracy"]
    evaluation = json.loads((run / "evaluation.json").read_text())
    matrix = evaluation["confusion_matrix"]
    assert evaluation["round"] == 2 and evaluation["labels"] == ["negative", "positive"]
    assert sum(map(sum, matrix)) == evaluation["examples"] == 40  # the whole test file
    assert (matrix[0][0] + matrix[1][1]) / 40 == pytest.approx(final, abs=1e-12)
    assert evaluation["accuracy"] == pytest.approx(final, abs=1e-12)
    assert [sum(r) for r in matrix] == [20, 20]  # rows: true labels (alternating in the file)
    for row in rounds:  # every centralised evaluation, round 0 included
        cells = row["test_confusion"]
        assert sum(map(sum, cells)) == 40
        assert (cells[0][0] + cells[1][1]) / 40 == pytest.approx(row["test_accuracy"])
    page = parse_page(run / "report.html")  # as the run left it: no command in between
    assert len(page.images) == 3
    text = " ".join(page.text)
    assert "tiny" in text and "DP was off" in text
    assert "client replies" in text and "neither LoRA factors" not in text
    assert f"{final:.4f}" in text
    assert "Confusion matrix" in text and "after round 2, 40 examples" in text
    assert "fedlora evaluate" not in text

    assert main(["evaluate", str(run)]) == 0
    assert "confusion matrix" in capsys.readouterr().out
    again = json.loads((run / "evaluation.json").read_text())
    assert again["examples"] == 40
    assert again["accuracy"] == pytest.approx(final, abs=1.5 / 40)  # padding may differ
