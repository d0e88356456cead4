"""Privacy accounting: cross-checks against dp_accounting, calibration, ledger persistence,
config checks and the clip-and-noise helpers of update mode."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from fedlora.config import ConfigError
from fedlora.privacy import (
    RDP_ORDERS,
    PrivacyBudget,
    PrivacyConfigError,
    calibrate_noise_multiplier,
    check_privacy_params,
    clip_update,
    compute_epsilon,
    epsilon_dp_accounting,
    epsilon_of_history,
    gaussian_noise_like,
    parse_dp_mode,
    planned_steps,
    privatize_reply,
    update_noise_std,
)

DELTA = 1e-5


# --------------------------------------------------------------------------- accounting


@pytest.mark.parametrize(
    ("sigma", "q", "rounds", "local_steps"),
    [
        (0.8, 0.01, 50, 10),    # 500 steps
        (1.0, 0.05, 8, 10),     # 80 steps
        (1.1, 0.2, 2, 5),       # 10 steps
        (1.5, 0.1, 20, 10),     # 200 steps
        (2.0, 0.01, 1, 10),     # 10 steps
        (2.0, 0.2, 25, 4),      # 100 steps
        (1.2, 1.0, 8, 1),       # update mode: one release per round, q = 1
    ],
)
def test_rdp_epsilon_matches_dp_accounting_within_1_percent(sigma, q, rounds, local_steps):
    pytest.importorskip("dp_accounting")
    acc = PrivacyBudget("rdp")
    for _ in range(rounds):
        acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=local_steps)
    steps = rounds * local_steps
    assert acc.history == [(sigma, q, steps)]  # rounds merge in Opacus' history format
    ours = acc.epsilon(DELTA)
    theirs = epsilon_dp_accounting(noise_multiplier=sigma, sample_rate=q, steps=steps,
                                   delta=DELTA)
    assert ours > 0 and math.isfinite(ours)
    assert ours == pytest.approx(theirs, rel=0.01)


def test_rdp_epsilon_is_opacus_accountant_epsilon():
    history = [(1.0, 0.05, 30), (1.3, 0.02, 7), (1.0, 0.05, 11)]
    acc = PrivacyBudget("rdp")
    for sigma, q, n in history:
        acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)
    opacus = RDPAccountant()
    opacus.history = list(history)
    assert acc.epsilon(DELTA) == opacus.get_epsilon(DELTA, alphas=list(RDP_ORDERS))
    # and with Opacus' own default orders the bound can only be looser
    assert opacus.get_epsilon(DELTA) >= acc.epsilon(DELTA)


def test_prv_is_tighter_than_rdp_and_handles_tiny_sigma():
    rdp = compute_epsilon(noise_multiplier=1.0, sample_rate=0.05, steps=20, delta=DELTA)
    prv = compute_epsilon(noise_multiplier=1.0, sample_rate=0.05, steps=20, delta=DELTA,
                          accountant="prv")
    assert 0 < prv <= rdp
    # PRV is slow/unstable for tiny sigma: falls back to the (finite, valid) RDP bound.
    tiny = compute_epsilon(noise_multiplier=0.05, sample_rate=0.5, steps=80, delta=DELTA,
                           accountant="prv")
    assert tiny == compute_epsilon(noise_multiplier=0.05, sample_rate=0.5, steps=80, delta=DELTA)
    assert math.isfinite(tiny)


def test_empty_accountant_has_spent_nothing():
    assert PrivacyBudget("rdp").epsilon(DELTA) == 0.0
    assert PrivacyBudget("prv").epsilon(DELTA) == 0.0
    assert compute_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=0, delta=DELTA) == 0.0


rounds_strategy = st.lists(
    st.tuples(st.sampled_from([0.7, 1.0, 1.5, 3.0]), st.sampled_from([0.01, 0.05, 0.2, 1.0]),
              st.integers(min_value=0, max_value=40)),
    min_size=1, max_size=6,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rounds=rounds_strategy)
def test_epsilon_never_decreases_across_rounds(rounds):
    acc = PrivacyBudget("rdp")
    previous = acc.epsilon(DELTA)
    for sigma, q, n in rounds:
        acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)
        now = acc.epsilon(DELTA)
        assert now >= previous
        previous = now
    assert acc.total_steps == sum(n for _, _, n in rounds)


def test_prv_epsilon_never_decreases_over_a_few_rounds():
    acc = PrivacyBudget("prv")
    previous = 0.0
    for sigma, q, n in [(1.0, 0.05, 10), (1.0, 0.05, 10), (1.3, 0.05, 5), (1.0, 0.1, 3)]:
        acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)
        now = acc.epsilon(DELTA)
        assert now >= previous
        previous = now


def test_step_validates_and_ignores_zero_steps():
    acc = PrivacyBudget("rdp")
    acc.step(noise_multiplier=1.0, sample_rate=0.1, num_steps=0)
    assert acc.history == []
    for bad in [dict(noise_multiplier=0.0, sample_rate=0.1, num_steps=1),
                dict(noise_multiplier=float("nan"), sample_rate=0.1, num_steps=1),
                dict(noise_multiplier=1.0, sample_rate=0.0, num_steps=1),
                dict(noise_multiplier=1.0, sample_rate=1.5, num_steps=1),
                dict(noise_multiplier=1.0, sample_rate=0.1, num_steps=-1),
                dict(noise_multiplier=1.0, sample_rate=0.1, num_steps=2.5)]:
        with pytest.raises(ValueError):
            acc.step(**bad)
    with pytest.raises(TypeError):
        acc.step(1.0, 0.1, 1)  # keyword-only
    with pytest.raises(ValueError):
        PrivacyBudget("gdp")


def test_planned_steps_is_every_round_times_local_steps():
    assert planned_steps(num_rounds=8, local_steps=10) == 80
    assert planned_steps(num_rounds=5, local_steps=1) == 5
    with pytest.raises(ValueError):
        planned_steps(num_rounds=0, local_steps=10)


@pytest.mark.parametrize(
    ("accountant", "target", "q", "steps"),
    [("rdp", 1.0, 0.05, 80), ("rdp", 8.0, 0.01, 1000), ("rdp", 3.0, 1.0, 8),
     ("rdp", 0.1, 1.0, 20),
     ("prv", 1.0, 0.05, 80), ("prv", 4.0, 1.0, 5)],
)
def test_calibrated_run_ends_at_or_just_under_target(accountant, target, q, steps):
    sigma = calibrate_noise_multiplier(target_epsilon=target, target_delta=DELTA, sample_rate=q,
                                       steps=steps, accountant=accountant)
    eps = compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA,
                          accountant=accountant)
    assert target * 0.97 < eps <= target
    # a little less noise would overshoot: the calibration is (close to) tight
    assert compute_epsilon(noise_multiplier=sigma * 0.95, sample_rate=q, steps=steps,
                           delta=DELTA, accountant=accountant) > target
    # the planned run, round by round, fits the budget exactly under PrivacyBudget
    acc = PrivacyBudget(accountant, target_epsilon=target, target_delta=DELTA)
    rounds, per_round = (steps // 10, 10) if steps % 10 == 0 and steps >= 10 else (steps, 1)
    for _ in range(rounds):
        assert not acc.would_exceed(noise_multiplier=sigma, sample_rate=q, num_steps=per_round)
        acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=per_round)
    assert acc.epsilon() == pytest.approx(eps, abs=1e-12)
    assert acc.would_exceed(noise_multiplier=sigma, sample_rate=q, num_steps=per_round)


def test_calibration_rejects_impossible_or_bad_inputs():
    with pytest.raises(ValueError):
        calibrate_noise_multiplier(target_epsilon=0.0, target_delta=DELTA, sample_rate=0.1,
                                   steps=10)
    with pytest.raises(ValueError):
        calibrate_noise_multiplier(target_epsilon=1.0, target_delta=1.0, sample_rate=0.1,
                                   steps=10)
    with pytest.raises(ValueError):
        calibrate_noise_multiplier(target_epsilon=1.0, target_delta=DELTA, sample_rate=0.1,
                                   steps=10, accountant="gdp")


def test_would_exceed_is_true_exactly_when_the_next_round_goes_over():
    sigma, q, local = 1.5, 0.05, 10
    target = 2.0  # reached after 11 of these rounds
    acc = PrivacyBudget("rdp", target_epsilon=target, target_delta=DELTA)
    for rounds_done in range(100):
        after = epsilon_of_history(acc.history + [(sigma, q, local)], delta=DELTA)
        exceeds = acc.would_exceed(noise_multiplier=sigma, sample_rate=q, num_steps=local,
                                   target_epsilon=target, delta=DELTA)
        assert exceeds == (after > target)
        before = acc.epsilon(DELTA)
        if exceeds:
            break
        acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=local)
        assert acc.epsilon(DELTA) == after > before  # would_exceed records nothing itself
    else:
        pytest.fail("budget never ran out")
    assert rounds_done == 11 and acc.total_steps == 110
    assert acc.epsilon(DELTA) <= target
    # a run whose budget ends exactly at the target is not "exceeding"
    assert not acc.would_exceed(noise_multiplier=sigma, sample_rate=q, num_steps=0,
                                target_epsilon=acc.epsilon(DELTA), delta=DELTA)


# --------------------------------------------------------------------------- config


def test_parse_dp_mode():
    assert parse_dp_mode("off") == ()
    assert [m.name for m in parse_dp_mode("sample")] == ["sample"]
    assert [m.name for m in parse_dp_mode("sample+client")] == ["sample", "client"]
    for bad in ["foo", "off+sample", "", "sample+", "sample+sample", "+update", "sample+update",
                "update+client", "client+sample", " sample"]:
        with pytest.raises(PrivacyConfigError) as info:
            parse_dp_mode(bad)
        assert info.value.key == "dp-mode" and repr(bad) in str(info.value)


GOOD = dict(target_epsilon=8.0, target_delta=1e-5, max_grad_norm=1.0, mode="sample")


def test_check_privacy_params_accepts_good_values():
    def names(modes):
        return [m.name for m in modes]

    assert names(check_privacy_params(**GOOD)) == ["sample"]
    assert names(check_privacy_params(**{**GOOD, "mode": "off"})) == []
    assert names(check_privacy_params(**GOOD, num_examples=1000)) == ["sample"]


@pytest.mark.parametrize(
    ("override", "key", "shown"),
    [
        ({"target_epsilon": 0.0}, "target-epsilon", "0.0"),
        ({"target_epsilon": -1.0}, "target-epsilon", "-1.0"),
        ({"target_epsilon": float("inf")}, "target-epsilon", "inf"),
        ({"target_epsilon": float("nan")}, "target-epsilon", "nan"),
        ({"target_delta": 0.0}, "target-delta", "0.0"),
        ({"target_delta": 1.0}, "target-delta", "1.0"),
        ({"target_delta": 1e-3, "num_examples": 1000}, "target-delta", "0.001"),
        ({"target_delta": 0.01, "num_examples": 500}, "target-delta", "0.01"),
        ({"max_grad_norm": 0.0}, "max-grad-norm", "0.0"),
        ({"max_grad_norm": -0.5}, "max-grad-norm", "-0.5"),
        ({"mode": "foo"}, "dp-mode", "'foo'"),
        ({"mode": "off+sample"}, "dp-mode", "'off+sample'"),
    ],
)
def test_check_privacy_params_names_key_and_value(override, key, shown):
    with pytest.raises(PrivacyConfigError) as info:
        check_privacy_params(**{**GOOD, **override})
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, ConfigError)
    assert err.key == key
    assert str(err).startswith(f"run-config key '{key}' has bad value {shown}: expected ")


# --------------------------------------------------------------------------- update mode


def _update(seed: int = 0, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"layer.0.lora_A.weight": (rng.standard_normal((8, 32)) * scale).astype(np.float32),
            "layer.0.lora_B.weight": (rng.standard_normal((32, 8)) * scale).astype(np.float32),
            "classifier.bias": (rng.standard_normal(2) * scale).astype(np.float32)}


def _norm(arrays) -> float:
    return math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in arrays.values()))


@pytest.mark.parametrize("max_norm", [1e-3, 0.1, 1.0, 3.7, 22.5])
def test_clip_update_bounds_the_global_norm(max_norm):
    update = _update(scale=1.0)  # global norm about 22.7
    clipped, norm = clip_update(update, max_norm)
    assert norm == pytest.approx(_norm(update), rel=1e-12)
    assert _norm(clipped) <= max_norm
    assert _norm(clipped) == pytest.approx(max_norm, rel=1e-5)
    for k in update:  # same direction, same dtype and shape
        assert clipped[k].dtype == np.float32 and clipped[k].shape == update[k].shape
        np.testing.assert_allclose(clipped[k], update[k] * (max_norm / norm), rtol=1e-5,
                                   atol=1e-12)


def test_clip_update_leaves_small_updates_unchanged():
    update = _update(scale=0.01)
    clipped, norm = clip_update(update, 1.0)
    assert norm < 1.0
    for k in update:
        np.testing.assert_array_equal(clipped[k], update[k])
        assert clipped[k] is not update[k]
    with pytest.raises(ValueError):
        clip_update({"a": np.array([1.0, np.nan], dtype=np.float32)}, 1.0)
    with pytest.raises(ValueError):
        clip_update(update, 0.0)


def test_update_noise_std():
    # sensitivity 2C: two neighbouring datasets give clipped updates up to 2C apart
    assert update_noise_std(noise_multiplier=1.3, max_norm=0.5) == pytest.approx(1.3)
    with pytest.raises(ValueError):
        update_noise_std(noise_multiplier=0.0, max_norm=0.5)


def test_update_noise_has_the_calibrated_std():
    sigma, max_norm = 1.3, 0.5
    std = update_noise_std(noise_multiplier=sigma, max_norm=max_norm)
    shapes = {"a": (256, 512), "b": (512, 256), "c": (1000,)}
    clean = {k: np.full(s, 0.25, dtype=np.float32) for k, s in shapes.items()}
    noise = gaussian_noise_like(clean, std, np.random.default_rng(1234))
    assert all(noise[k].shape == clean[k].shape for k in clean)
    noised = {k: clean[k] + noise[k] for k in clean}
    diff = np.concatenate([(noised[k] - clean[k]).astype(np.float64).ravel() for k in clean])
    n = diff.size
    sample_std = diff.std(ddof=1)
    # standard error of the sample std of n normal draws: std / sqrt(2 (n - 1))
    se = std / math.sqrt(2 * (n - 1))
    assert abs(sample_std - std) < 5 * se          # statistical check (5 standard errors)
    assert abs(sample_std - std) < 0.03 * std      # and the ~3% requirement
    assert abs(diff.mean()) < 5 * std / math.sqrt(n)
    # arrays get independent noise
    assert abs(np.corrcoef(noise["a"].ravel(), noise["b"].ravel())[0, 1]) < 5 / math.sqrt(
        noise["a"].size)


def test_privatize_reply_is_received_plus_clipped_update_plus_noise():
    update = _update(scale=1.0)
    received = {k: np.zeros_like(v) for k, v in update.items()}
    noised = privatize_reply(update, received, max_norm=1.0, noise_multiplier=0.5,
                             rng=np.random.default_rng(7))
    clipped, _ = clip_update(update, 1.0)
    noise = gaussian_noise_like(clipped, 0.5 * 2 * 1.0, np.random.default_rng(7))
    for k in update:
        np.testing.assert_allclose(noised[k], clipped[k] + noise[k], rtol=0, atol=1e-5)
