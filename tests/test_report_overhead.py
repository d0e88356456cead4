"""The report shows secure aggregation's overhead against the same run without it: bytes
per site per round each way, seconds per round, and their ratios (fake run folders)."""

from __future__ import annotations

import json
from pathlib import Path

from fedlora.cli import main
from fedlora.report import load_run
from fedlora.report.overhead import baseline_for, costs, stage_bytes
from tests.test_report import COMMS_COLUMNS, MSG_BYTES, NODES, _write_csv, make_run, parse_page

STAGE_BYTES = {"secagg_setup": (42, 164), "secagg_advertise": (225, 268),
               "secagg_share_keys": (213, 327),
               "secagg_masked_input": (2 * MSG_BYTES, 219), "secagg_consistency": (73, 22),
               "secagg_unmask": (135, 156)}  # (up, down) per site per round


def make_secure_run(parent: Path, name: str, rounds: int = 2, **config) -> Path:
    """A fake run folder of a secure run: per round and site the stages' bytes and the
    adapter broadcast (``train``, down), three seconds a round."""
    run = make_run(parent, name, rounds)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["config"].update({"secure-aggregation": True, "secagg-clip": 0.05, **config})
    up = sum(u for u, _ in STAGE_BYTES.values())
    down = sum(d for _, d in STAGE_BYTES.values()) + MSG_BYTES
    for r in metrics["rounds"][1:]:
        r.update(bytes_up=up * len(NODES), bytes_down=down * len(NODES), round_seconds=3.0)
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "config.json").write_text(json.dumps(metrics["config"]))
    rows = []
    for rnd in range(1, rounds + 1):
        for node in NODES:
            rows.append({"round": rnd, "node": node, "direction": "down", "kind": "train",
                         "bytes": MSG_BYTES, "analytic_bytes": MSG_BYTES})
            for kind, (u, d) in STAGE_BYTES.items():
                rows += [{"round": rnd, "node": node, "direction": "down", "kind": kind,
                          "bytes": d, "analytic_bytes": d},
                         {"round": rnd, "node": node, "direction": "up", "kind": kind,
                          "bytes": u, "analytic_bytes": u}]
    _write_csv(run / "comms.csv", COMMS_COLUMNS, [
        {c: row.get(c, "") for c in COMMS_COLUMNS} for row in rows])
    return run


def _section(html_text: str) -> str:
    assert "Secure aggregation overhead" in html_text
    return html_text.split("Secure aggregation overhead", 1)[1].split("<h2>", 1)[0]


def test_the_comparison_page_sets_the_secure_run_against_the_plain_one(tmp_path):
    secure, plain = make_secure_run(tmp_path, "secure"), make_run(tmp_path, "plain")
    out = tmp_path / "cmp.html"
    assert main(["report", str(secure), str(plain), "-o", str(out)]) == 0
    parse_page(out)
    section = _section(out.read_text())
    up = sum(u for u, _ in STAGE_BYTES.values())
    down = sum(d for _, d in STAGE_BYTES.values()) + MSG_BYTES
    assert f"{up:,}" in section and f"{down:,}" in section and f"{MSG_BYTES:,}" in section
    assert f"{up / MSG_BYTES:.2f}x" in section and f"{down / MSG_BYTES:.2f}x" in section
    assert "3.0" in section and "1.5" in section and "2.00x" in section  # seconds per round
    assert "also differ" not in section  # the same run but for secure aggregation
    for kind in STAGE_BYTES:  # the secure run's bytes by stage
        assert kind in section
    assert "equal its formula" in section  # measured == analytic


def test_the_closest_plain_run_is_the_baseline_and_other_differences_are_named(tmp_path):
    secure = load_run(make_secure_run(tmp_path, "secure"))
    same = load_run(make_run(tmp_path, "same"))
    other = load_run(make_run(tmp_path, "other"))
    object.__setattr__(other, "config", {**other.config, "lora-rank": 8})
    assert baseline_for(secure, [other, secure, same]) == (same, [])
    assert baseline_for(secure, [secure, other]) == (other, ["lora-rank"])
    assert baseline_for(secure, [secure]) is None
    out = tmp_path / "cmp.html"
    runs = [make_secure_run(tmp_path / "x", "s", **{"lora-rank": 8}), make_run(tmp_path, "p")]
    assert main(["report", *map(str, runs), "-o", str(out)]) == 0
    assert "also differ in: lora-rank" in _section(out.read_text())


def test_costs_are_per_site_and_training_round_and_stages_split_them(tmp_path):
    run = load_run(make_secure_run(tmp_path, "secure", rounds=3))
    c = costs(run)
    assert c.rounds == 3 and c.seconds == 3.0  # round 0 (the initial evaluation) left out
    assert c.up == sum(u for u, _ in STAGE_BYTES.values())
    stages = stage_bytes(run)
    assert list(stages) == ["train", *STAGE_BYTES]  # the protocol's order
    assert stages["train"] == (0, MSG_BYTES)
    assert {k: v for k, v in stages.items() if k != "train"} == STAGE_BYTES


def test_a_single_run_page_shows_its_own_costs_and_how_to_compare(tmp_path):
    secure, plain = make_secure_run(tmp_path, "secure"), make_run(tmp_path, "plain")
    assert main(["report", str(secure)]) == 0 and main(["report", str(plain)]) == 0
    section = _section((secure / "report.html").read_text())
    assert "fedlora report" in section and "PLAIN_RUN" in section
    assert "secagg_masked_input" in section
    assert "Secure aggregation overhead" not in (plain / "report.html").read_text()
