"""The site owns its privacy: attacks by a server that writes the run-config and crafts the
broadcast, and by whoever reads what a site releases.

Each test plays the attacker against the site's real code path (``train_fn``) and fails on a
broken mechanism: a run weaker than the site's node-config policy must be refused before the
data is read; one added example may move DP-SGD's clipped sum by at most C whatever dropout
and padding do; an overflowing example must not turn into an un-noised refusal; a site at
its cap releases no count; the noise must have the calibrated scale and be unpredictable.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from fedlora import privacy
from fedlora.privacy.count import COUNT_NOISE_STD, full_batch_denominator
from fedlora.protocol import LORA_KEY, METRICS_KEY, STATUS_KEY
from fedlora.runtime import parse_run_config

from .conftest import assert_noise_std, write_reviews
from .test_dp_attacks import _diff, _released, _run_site, _train_message


def _refusal(reply) -> str:
    assert reply.content[STATUS_KEY]["status"] != "ok"
    assert LORA_KEY not in reply.content
    assert dict(reply.content[METRICS_KEY]) == {"num-examples": 0}  # nothing about the data
    return reply.content[STATUS_KEY]["reason"]


WEAKER_RUNS = [  # (run-config overrides, site policy, the node-config key the refusal names)
    ({"dp-mode": "off"}, {"accept-dp-modes": "sample"}, "accept-dp-modes"),
    ({"dp-mode": "client"}, {"accept-dp-modes": "sample,update"}, "accept-dp-modes"),
    ({"dp-mode": "sample", "target-epsilon": 1e6}, {"accept-dp-modes": "sample",
                                                    "max-epsilon": 8.0}, "max-epsilon"),
    ({"dp-mode": "update", "target-delta": 1e-2}, {"accept-dp-modes": "update",
                                                   "max-delta": 1e-5}, "max-delta"),
    ({"dp-mode": "sample"}, {}, "accept-dp-modes"),  # a deployed site without a policy
    ({"dp-mode": "sample"}, {"accept-dp-modes": "sample,bogus"}, "accept-dp-modes"),
    ({"dp-mode": "sample"}, {"accept-dp-modes": "sample", "min-reply-seconds": "soon"},
     "min-reply-seconds"),
    ({"dp-mode": "sample"}, {"accept-dp-modes": "sample", "require-secure-aggregation": True},
     "require-secure-aggregation"),
]


@pytest.mark.parametrize("overrides,policy,key", WEAKER_RUNS,
                         ids=["off", "client", "epsilon", "delta", "no-policy", "bad-policy",
                              "bad-reply-floor", "not-secure"])
def test_a_run_weaker_than_the_sites_policy_is_refused_before_its_data_is_read(
        identity, site, tmp_path, overrides, policy, key):
    run_config = dict(site, **overrides)
    ledger = tmp_path / "site" / "privacy.json"
    # The data file does not exist: a site that read it would refuse for that reason instead.
    node = {"data-path": str(tmp_path / "never-read.csv"), "privacy-state-path": str(ledger),
            **policy}
    reason = _refusal(_run_site(run_config, node, _train_message(run_config)))
    assert f"'{key}'" in reason, reason
    assert not ledger.exists() and not (tmp_path / "site").exists()  # no release, no charge


def test_a_server_that_times_replies_learns_nothing_about_the_sites_data(identity, site,
                                                                         tmp_path):
    """A site's compute time grows with its data. With ``min-reply-seconds`` every reply, a
    small site's, a large site's and a refusal, takes the floor; without it, the refusal
    comes back at once and the timings would tell the sites apart."""
    import time

    hold = 4.0
    timings = {}
    for name, rows, overrides in (("small", 20, {}), ("large", 160, {}),
                                  ("refused", 20, {"dp-mode": "off"})):
        data = write_reviews(tmp_path / f"{name}.csv", rows, seed=rows)
        run_config = dict(site, **{"dp-mode": "sample", "data-path": str(data), **overrides})
        for floor in (None, hold):
            node = {"data-path": str(data), "accept-dp-modes": "sample",
                    "privacy-state-path": str(tmp_path / f"{name}-{floor}" / "privacy.json")}
            if floor is not None:
                node["min-reply-seconds"] = floor
            msg = _train_message(run_config)
            t0 = time.monotonic()
            reply = _run_site(run_config, node, msg)
            timings[name, floor] = time.monotonic() - t0
            if floor is not None:  # what the server reads from the messages' stamps
                stamped = reply.metadata.created_at - msg.metadata.created_at
                assert stamped >= hold and reply.metadata.ttl <= msg.metadata.ttl - hold, (
                    name, stamped, reply.metadata.ttl, msg.metadata.ttl)
            assert (reply.content[STATUS_KEY]["status"] == "ok") == (name != "refused")
    assert timings["refused", None] < 1.0  # the channel the floor closes
    held = [timings[name, hold] for name in ("small", "large", "refused")]
    assert min(held) >= hold and max(held) - min(held) < 1.0, timings


def test_in_a_secure_run_a_site_answers_no_plain_train_or_evaluate(identity, site):
    """A server that asks for secure aggregation and then sends a plain train or evaluate
    message would get the site's update or metrics in the clear: the site refuses both."""
    from fedlora.app.client.client_app import evaluate_fn

    run_config = dict(site, **{"secure-aggregation": True})  # dp-mode off, allowed
    node = {"data-path": site["data-path"], "accept-dp-modes": "off"}
    assert "secure-aggregation" in _refusal(_run_site(run_config, node,
                                                      _train_message(run_config)))
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(),
                      run_config=run_config)
    assert "secure-aggregation" in _refusal(evaluate_fn(_train_message(run_config), context))
    plain = dict(site, **{"dp-mode": "off"})  # the same site answers a plain run
    assert _run_site(plain, node, _train_message(plain)).content[STATUS_KEY]["status"] == "ok"


def test_a_simulated_site_with_a_policy_enforces_it_and_evaluates_nothing(identity, site):
    from fedlora.app.client.client_app import evaluate_fn

    run_config = dict(site, **{"dp-mode": "off"})
    node = {"partition-id": 0, "num-partitions": 2, "accept-dp-modes": "sample"}
    assert "'accept-dp-modes'" in _refusal(_run_site(run_config, node,
                                                     _train_message(run_config)))
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(),
                      run_config=run_config)
    answer = evaluate_fn(_train_message(run_config), context)
    assert "'accept-dp-modes'" in _refusal(answer)


def test_the_ledger_is_capped_at_the_sites_epsilon_never_the_runs(identity, site, tmp_path):
    ledger = tmp_path / "site" / "privacy.json"
    node = {"data-path": site["data-path"], "privacy-state-path": str(ledger),
            "accept-dp-modes": "sample", "max-epsilon": 6.0, "max-delta": 1e-3}
    run_config = dict(site, **{"dp-mode": "sample", "dp-recipe": "none", "target-epsilon": 4.0})
    reply = _run_site(run_config, node, _train_message(run_config))
    _released(reply)
    stored = privacy.load_state(ledger)
    assert stored.target_epsilon == 6.0  # the site's cap, not the run's 4
    assert 0 < reply.content[METRICS_KEY]["dp-epsilon"] <= 4.0
    # A noise floor above the plan's sigma: refused, naming the key, not the sigma itself
    # (it follows from the released count).
    floor = dict(node, **{"min-noise-multiplier": 1e3})
    reason = _refusal(_run_site(run_config, floor, _train_message(run_config, 2)))
    assert "'min-noise-multiplier'" in reason and "1000" in reason


def test_a_site_at_its_cap_releases_no_count(identity, site, tmp_path):
    """A ledger that spent nearly all of its cap in update mode (which releases no count):
    a sample-mode run must not draw the count, since its charge alone would exceed the cap;
    the refusal carries nothing derived from a count and the ledger stays at or below its cap."""
    path = tmp_path / "site" / "privacy.json"
    acc = privacy.PrivacyBudget("rdp", target_delta=1e-3)
    acc.step(noise_multiplier=3.0, sample_rate=1.0, num_steps=4)
    spent = acc.epsilon(1e-3)
    cap = round(spent + 2e-4, 6)  # the count's release costs about 1e-3 more
    acc.target_epsilon = cap
    privacy.save_state(path, acc)
    assert spent <= cap and acc.epsilon_after(noise_multiplier=COUNT_NOISE_STD, sample_rate=1.0,
                                              num_steps=1) > cap
    node = {"data-path": site["data-path"], "privacy-state-path": str(path),
            "accept-dp-modes": "sample,update", "max-epsilon": cap}
    run_config = dict(site, **{"dp-mode": "sample", "dp-recipe": "none", "target-epsilon": cap})
    reply = _run_site(run_config, node, _train_message(run_config))
    assert reply.content[STATUS_KEY]["status"] == "budget-exhausted"
    _refusal(reply)
    after = privacy.load_state(path)
    assert after.count is None and after.count_releases == []
    assert after.epsilon(1e-3) == pytest.approx(spent) and after.epsilon(1e-3) <= cap


# --------------------------------------------------------------------------- sensitivity


def _tiny_model(tiny_model_dir, dropout: float):
    from fedlora.models import LoraSpec, build_lora_model

    spec = LoraSpec(str(tiny_model_dir), 2, 4, 8.0, dropout, ("query", "value"), True,
                    pooling="mean")
    return build_lora_model(spec)


def test_one_added_example_moves_the_clipped_sum_by_at_most_c_with_dropout_on(
        tiny_model_dir, tmp_path):
    """DP-SGD at q = 1, no noise, one SGD step of learning rate 1 on the summed clipped
    gradient: the step is the clipped sum. With dropout on in the model (hidden, attention,
    LoRA and head dropout 0.1), adding one example (the longest, so the padded width changes
    too) may change the sum by its own clipped gradient only: at most C."""
    from fedlora.adapters import adapter_state
    from fedlora.data import EncodedDataset, read_table
    from fedlora.dp_sgd import train_private
    from fedlora.models import load_tokenizer

    path = write_reviews(tmp_path / "r.csv", 10, seed=5)
    lines = path.read_text().splitlines()
    lines[-1] = ("the film was great and moving and superb and charming and funny and "
                 "brilliant,positive,s0")  # the added example: the longest row
    path.write_text("\n".join(lines) + "\n")
    data = read_table(path, text_column="text", label_column="label",
                      label_names=("negative", "positive"))
    enc = EncodedDataset(data, load_tokenizer(str(tiny_model_dir)), 32)
    c = 0.01  # every example's gradient is clipped

    def clipped_sum(indices) -> np.ndarray:
        model = _tiny_model(tiny_model_dir, 0.1)
        before = adapter_state(model)
        train_private(model, enc, indices, steps=1, batch_size=len(indices), learning_rate=1.0,
                      noise_multiplier=0.0, max_grad_norm=c, optimizer="sgd",
                      sample_rate=1.0, expected_batch_size=1)
        return -_diff(adapter_state(model), before)

    without, with_one = clipped_sum(np.arange(9)), clipped_sum(np.arange(10))
    assert np.linalg.norm(without) > c  # a real sum of clipped gradients, not zero
    moved = np.linalg.norm(with_one - without)
    assert moved <= c * (1 + 1e-3), f"one example moved the clipped sum by {moved / c:.3f} C"


def _overflowing_model(tiny_model_dir, tmp_path, word: str):
    """The tiny model with ``word``'s embedding at inf: any example containing it overflows
    (as a crafted broadcast can make chosen inputs overflow)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    (token,) = tok(word, add_special_tokens=False)["input_ids"]
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("inf")
    out = tmp_path / "overflowing-model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("phase", ["lora", "probe"])
def test_an_overflowing_example_gives_a_finite_noised_release(identity, site, tmp_path,
                                                               tiny_model_dir, phase):
    """One example whose gradient is non-finite: under DP the site still releases a finite,
    noised step (the example counts as zero), so whether it replies says nothing about
    whether that example is there."""
    model_dir = _overflowing_model(tiny_model_dir, tmp_path, "zebra")
    data = write_reviews(tmp_path / "site.csv", 60, seed=2)
    with data.open("a") as f:
        f.write("the film was a zebra,positive,s0\n")
    run_config = dict(site, **{"dp-mode": "sample", "model-path": str(model_dir),
                               "data-path": str(data), "optimizer": "sgd",
                               "dp-recipe": "auto" if phase == "probe" else "none",
                               "num-partitions": 1})
    msg = _train_message(run_config)
    received = _released_of(msg)
    reply = _run_site(run_config, {"partition-id": 0, "num-partitions": 1}, msg)
    released = _released(reply)
    step = _diff(released, received)
    assert np.isfinite(step).all() and np.abs(step).max() > 0


def _released_of(msg) -> dict[str, np.ndarray]:
    from fedlora.wire import from_record

    return from_record(msg.content[LORA_KEY])


# --------------------------------------------------------------------------- noise scale


class _AllSampled(np.random.Generator):
    def random(self, size=None):  # every Poisson coin says "sampled"
        return np.zeros(size)


@pytest.fixture()
def fixed_count(monkeypatch):
    """Every site releases the count 60 (so every replay plans the same sigma), and every
    Poisson coin says "sampled" (so every replay computes the same clipped sum): what differs
    between two replays is the noise alone."""
    from fedlora import entropy
    from fedlora.privacy import ledger

    monkeypatch.setattr(ledger, "noised_count", lambda n, *a, **k: 60)
    real = entropy.private_numpy_rng
    monkeypatch.setattr(entropy, "private_numpy_rng",
                        lambda: _AllSampled(real().bit_generator))
    return 60


def _replay_residuals(run_config: dict, pairs: int, server_round: int = 1) -> np.ndarray:
    msg = _train_message(run_config, server_round)
    node = {"partition-id": 0, "num-partitions": 2}
    out = []
    for _ in range(pairs):
        a = _released(_run_site(run_config, node, msg))
        b = _released(_run_site(run_config, node, msg))
        out.append(_diff(a, b))
    return np.concatenate(out)


def test_lora_dp_sgd_noise_has_the_calibrated_scale_and_cannot_be_replayed(
        identity, site, fixed_count):
    """Two replays of one DP-SGD step (same message, data, run-config and seed) differ by
    the noise alone: per coordinate lr * (n1 - n2) / B, std sqrt(2) lr sigma C / B. Noise
    seeded from ``seed`` would leave 0; noise scaled down or doubled sensitivity, a std off
    by the factor."""
    run_config = dict(site, **{"dp-mode": "sample", "dp-recipe": "none", "optimizer": "sgd",
                               "learning-rate": 0.5, "local-steps": 1, "max-grad-norm": 0.5})
    cfg = parse_run_config(run_config)
    sigma = privacy.plan_for(cfg, fixed_count).noise_multiplier
    residual = _replay_residuals(run_config, pairs=1)
    expected = math.sqrt(2) * cfg.learning_rate * sigma * cfg.max_grad_norm / cfg.batch_size
    assert residual.size > 1000
    assert_noise_std(residual, expected)


def test_the_probes_noise_has_the_calibrated_scale_and_cannot_be_replayed(
        identity, site, fixed_count):
    """A probe round's full-batch step: the head's replays differ by
    lr * (n1 - n2) / max(count, 100), std sqrt(2) lr sigma C / max(count, 100)."""
    run_config = dict(site, **{"dp-mode": "sample", "probe-rounds": 2, "probe-steps": 1,
                               "probe-learning-rate": 2.0, "dp-recipe": "none",
                               "head-pooling": "mean"})
    cfg = parse_run_config(run_config)
    sigma = privacy.plan_for(cfg, fixed_count).noise_multiplier
    residual = _replay_residuals(run_config, pairs=12)
    residual = residual[residual != 0]  # the LoRA factors are left as received
    expected = (math.sqrt(2) * cfg.probe_learning_rate * sigma * cfg.max_grad_norm
                / full_batch_denominator(fixed_count))
    assert residual.size >= 12 * 60
    assert_noise_std(residual, expected)
