"""The one-run privacy audit: its statistics, and audits of honest and broken mechanisms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom

from fedlora.privacy.audit import (
    audit_guesses,
    canary_scores,
    count_correct,
    epsilon_lower_bound,
    guess,
    max_lower_bound,
    p_value,
)

from .conftest import write_reviews


def _direct_p_value(r: int, v: int, eps: float, delta: float, m: int) -> float:
    """The theorem's bound written out with scipy's binomial, term by term."""
    p = math.exp(eps) / (1 + math.exp(eps))
    tail = binom.sf(v - 1, r, p)
    if delta > 0:
        tail += 2 * m * delta * max(
            sum(binom.pmf(k, r, p) for k in range(v - i, v)) / i for i in range(1, v + 1))
    return min(1.0, tail)


# --------------------------------------------------------------------------- statistics

@pytest.mark.parametrize("r,v,eps,delta,m", [(10, 10, 1.0, 0.0, 10), (40, 33, 1.5, 1e-5, 100),
                                             (100, 80, 0.5, 1e-3, 200), (7, 3, 2.0, 1e-2, 50)])
def test_p_value_is_the_binomial_tail_plus_the_delta_term(r, v, eps, delta, m):
    assert p_value(r, v, epsilon=eps, delta=delta, num_canaries=m) == pytest.approx(
        _direct_p_value(r, v, eps, delta, m), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("r", [5, 10, 40, 200])
def test_all_right_under_pure_dp_is_the_epsilon_with_p_to_the_r_at_five_percent(r):
    bound = epsilon_lower_bound(r, r, num_canaries=r, delta=0.0)
    p = 0.05 ** (1 / r)  # P[all r right] = p^r = 0.05
    assert bound == pytest.approx(math.log(p / (1 - p)), abs=1e-6)
    assert binom.sf(r - 1, r, 1 / (1 + math.exp(-bound))) == pytest.approx(0.05, rel=1e-5)
    assert max_lower_bound(r, num_canaries=r, delta=0.0) == bound


def test_the_bound_grows_with_the_right_guesses():
    bounds = [epsilon_lower_bound(60, v, num_canaries=100, delta=1e-5) for v in range(61)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:]))
    positive = [b for b in bounds if b > 0]
    assert len(positive) > 10 and all(a < b for a, b in zip(positive, positive[1:]))


@pytest.mark.parametrize("r,v", [(100, 50), (100, 58), (20, 10), (20, 3), (1, 1), (0, 0)])
def test_chance_level_guessing_proves_nothing(r, v):
    assert epsilon_lower_bound(r, v, num_canaries=max(r, 1), delta=0.0) == 0.0


def test_delta_lowers_the_bound():
    b = [epsilon_lower_bound(200, 190, num_canaries=1000, delta=d) for d in (0, 1e-6, 1e-5, 1e-4)]
    assert b[0] > b[1] > b[2] > b[3] > 0


def test_the_bound_holds_for_randomised_response_nineteen_times_in_twenty():
    """Randomised response with epsilon 1 is exactly 1-DP: each guess is right with
    probability e / (1 + e), independently. The 95% bound may exceed 1 in 5% of runs at most."""
    rng = np.random.default_rng(7)
    p = math.e / (1 + math.e)
    right = rng.binomial(100, p, size=400)
    over = np.mean([epsilon_lower_bound(100, int(v), num_canaries=100, delta=0.0) > 1.0
                    for v in right])
    assert over <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 400)
    # and the test has power: a 3-DP randomised response is caught most of the time
    strong = rng.binomial(100, math.exp(3) / (1 + math.exp(3)), size=50)
    assert np.mean([epsilon_lower_bound(100, int(v), num_canaries=100, delta=0.0) > 1.0
                    for v in strong]) > 0.9


def test_guesses_take_the_extremes_and_abstain_in_between():
    scores = np.array([0.3, 2.0, -1.0, 0.1, 5.0, -3.0])
    assert guess(scores, 2, 1).tolist() == [0, 1, 0, 0, 1, -1]
    assert guess(scores, 0, 2).tolist() == [0, 0, -1, 0, 0, -1]
    assert count_correct(guess(scores, 2, 2), np.array([0, 1, 1, 0, 1, 0], bool)) == (4, 3)
    with pytest.raises(ValueError):
        guess(scores, 4, 3)


def test_several_guess_sizes_pay_a_union_bound():
    rng = np.random.default_rng(3)
    included = rng.random(64) < 0.5
    scores = np.where(included, 1.0, -1.0) + rng.normal(0, 0.8, 64)
    sizes = [(4, 4), (8, 8), (16, 16)]
    out = audit_guesses(scores, included, sizes=sizes, delta=1e-5)
    each = [epsilon_lower_bound(*count_correct(guess(scores, a, b), included), num_canaries=64,
                                delta=1e-5, confidence=1 - 0.05 / 3) for a, b in sizes]
    assert [t[4] for t in out.tested] == pytest.approx(each)
    assert out.epsilon_lower_bound == pytest.approx(max(each))
    assert out.epsilon_lower_bound < max(  # the correction costs something
        epsilon_lower_bound(*count_correct(guess(scores, a, b), included), num_canaries=64,
                            delta=1e-5) for a, b in sizes)


def test_scores_pick_out_the_canaries_in_a_linear_update():
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(70, 400)) + 2.0 * rng.normal(size=(1, 400))  # shared direction
    m = 30
    included = rng.random(m) < 0.5
    used = np.concatenate([rng.random(40) < 0.7, included])  # real examples, then canaries
    unit = grads / np.linalg.norm(grads, axis=1, keepdims=True)
    step = -(rng.uniform(0.5, 1.5, 70) * used) @ unit  # descent over what was trained on
    scores = canary_scores(step + rng.normal(0, 0.01, 400), grads, m)
    assert scores[included].min() > scores[~included].max()
    noise_only = canary_scores(rng.normal(0, 0.01, 400), grads, m)
    assert noise_only[included].min() < noise_only[~included].max()


def test_bad_counts_are_refused():
    with pytest.raises(ValueError):
        p_value(10, 11, epsilon=1.0, delta=0.0, num_canaries=10)
    with pytest.raises(ValueError):
        epsilon_lower_bound(10, 5, num_canaries=10, delta=0.0, confidence=1.0)


# --------------------------------------------------------------------------- audits

def _tiny_task(root, *, hidden: int, layers: int):
    """Run-config overrides for a random BERT (weights drawn wide, so that the examples'
    gradients differ) and a small synthetic review file."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fedlora.tasks import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden,
                        max_position_embeddings=64, num_labels=2, initializer_range=0.5)
    BertForSequenceClassification(config).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    data = write_reviews(root / "reviews.csv", 60)
    return {"task": "custom", "model-path": str(root / "model"), "data-path": str(data),
            "labels": "negative,positive", "max-length": 16, "batch-size": 16}


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    """A 2-layer BERT of width 32 (its dropout as configured: 0.1)."""
    return _tiny_task(tmp_path_factory.mktemp("audit"), hidden=32, layers=2)


@pytest.fixture(scope="module")
def probe_task(tmp_path_factory):
    """A 1-layer BERT of width 128 read by mean pooling: its head's gradients span 129
    directions, room for the canaries (the width-32 head spans 33, fewer than 64 canaries;
    the wide random [CLS] pooler saturates and its rows span fewer still)."""
    return {**_tiny_task(tmp_path_factory.mktemp("probe"), hidden=128, layers=1),
            "head-pooling": "mean"}


def _audit(tiny_task, canaries=64, **kwargs):
    from simulations.audit_privacy import run_audit

    return run_audit(canaries=canaries, rounds=2, extra=tiny_task, log=lambda *a: None,
                     **kwargs)



def test_a_broken_dp_sgd_is_caught(tiny_task):
    out = _audit(tiny_task, mode="sample", epsilon=1.0, noise_scale=0.01)
    assert out["epsilon_lower_bound"] > 1.0, out


def test_an_honest_dp_sgd_stays_under_its_claim(tiny_task):
    from fedlora.privacy import calibrated_sigma
    from fedlora.privacy.count import COUNT_NOISE_STD, count_history

    out = _audit(tiny_task, mode="sample", epsilon=1.0)
    assert out["epsilon_lower_bound"] <= 1.0, out
    # sigma is the app's calibration for the rounds run (not a value of the audit's own)
    assert out["noise_multiplier"] == calibrated_sigma(
        1.0, 1e-5, out["sample_rate"], 2 * out["steps_per_round"], "rdp", (),
        tuple(count_history(COUNT_NOISE_STD)))


def test_update_noise_known_to_the_auditor_is_caught(tiny_task):
    out = _audit(tiny_task, mode="update", epsilon=1.0, known_noise=True)
    assert out["epsilon_lower_bound"] > 1.0, out


def test_honest_update_noise_stays_under_its_claim(tiny_task):
    out = _audit(tiny_task, mode="update", epsilon=1.0)
    assert out["epsilon_lower_bound"] <= 1.0, out


def test_known_noise_is_refused_for_dp_sgd(tiny_task):
    with pytest.raises(ValueError, match="known-noise"):
        _audit(tiny_task, mode="sample", known_noise=True)


# --------------------------------------------------------------------------- probe phase

def test_a_broken_linear_probe_is_caught(probe_task):
    out = _audit(probe_task, mode="sample", epsilon=1.0, noise_scale=0.01, phase="probe")
    assert out["phase"] == "probe" and out["probe_steps_per_round"] > 0
    assert out["scored_entries"] == 2 * 128 + 2  # the head's weight and bias, nothing else
    assert out["epsilon_lower_bound"] > 1.0, out


def test_an_honest_linear_probe_stays_under_its_claim(probe_task):
    out = _audit(probe_task, mode="sample", epsilon=1.0, phase="probe")
    assert out["epsilon_lower_bound"] <= 1.0, out


def test_the_probe_phase_needs_dp_sgd(tiny_task):
    with pytest.raises(ValueError):
        _audit(tiny_task, mode="update", phase="probe")


# --------------------------------------------------------------------------- repeats

def test_repeats_count_the_runs_whose_bound_exceeds_the_claim():
    from simulations.audit_privacy import aggregate

    runs = [{"claimed_epsilon": 1.0, "epsilon_lower_bound": b} for b in (0.0, 1.0, 1.01, 2.5)]
    out = aggregate(runs)
    assert out["repeats"] == 4 and out["flagged"] == 2  # a bound equal to the claim passes
    assert out["bounds"] == [0.0, 1.0, 1.01, 2.5] and out["median_bound"] == pytest.approx(1.005)
    with pytest.raises(ValueError):
        aggregate([])


def test_repeated_audits_draw_afresh_and_tally(probe_task):
    from simulations.audit_privacy import repeats_summary, run_audits

    out = run_audits(canaries=64, rounds=2, extra=probe_task, log=lambda *a: None,
                     mode="sample", epsilon=1.0, noise_scale=0.01, phase="probe", repeats=3)
    assert len(out["runs"]) == 3 and out["repeats"] == 3
    assert out["flagged"] == sum(r["epsilon_lower_bound"] > 1.0 for r in out["runs"]) == 3
    assert repeats_summary(out).startswith("flagged 3 of 3")


def test_the_auditor_takes_gradients_with_dropout_off_and_leaves_it_on(tiny_task):
    from torch import nn

    from fedlora import runtime
    from fedlora.models import build_lora_model
    from simulations.audit_gradients import key_params, per_example_gradients
    from simulations.audit_privacy import audit_config

    cfg = audit_config("sample", 1.0, 2, tiny_task)
    model = build_lora_model(runtime.model_spec(cfg))
    dropouts = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and max(dropouts) > 0  # the model keeps its configured dropout
    import numpy as np

    from fedlora.models import load_tokenizer
    from simulations.audit_gradients import make_canaries

    tok = load_tokenizer(tiny_task["model-path"])
    data = runtime.encode(cfg, make_canaries(tok, 8, ("negative", "positive"),
                                             np.random.default_rng(0)))
    # move B off zero so that every LoRA tensor has a gradient that dropout would change
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    keys = key_params(model)
    first = per_example_gradients(model, data, np.arange(8), keys)
    second = per_example_gradients(model, data, np.arange(8), keys)
    assert np.abs(first).max() > 0 and np.array_equal(first, second)
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == dropouts


def test_the_presence_ratio_is_the_binomial_mixture_of_gaussians():
    from fedlora.privacy.audit import presence_llr

    z, a = np.array([-1.0, 0.0, 2.5]), np.array([2.0, 2.0, 0.5])
    one = np.log(0.8 + 0.2 * np.exp(a * z - a ** 2 / 2))  # one step at q = 0.2
    assert presence_llr(z, signal=a, steps=1, sample_rate=0.2) == pytest.approx(one)
    two = np.log(sum(binom.pmf(k, 2, 0.3) * np.exp(a * z * k - a ** 2 * k ** 2 / 2)
                     for k in range(3)))
    assert presence_llr(z, signal=a, steps=2, sample_rate=0.3) == pytest.approx(two)
    full = presence_llr(z, signal=a, steps=3, sample_rate=1.0)  # drawn every step
    assert full == pytest.approx(3 * a * z - 9 * a ** 2 / 2)
