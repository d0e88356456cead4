"""SVD aggregation's error feedback: what truncation discards is carried to the next round."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.aggregation import SvdErrorFeedback, aggregate

from .test_aggregation import dense, exact_sum, make_updates, rel_err


def _rounds(state: SvdErrorFeedback, rounds: int, fixed: bool, rank: int = 2):
    """Run ``rounds`` rounds; return (sum of broadcast products, sum of exact aggregates, messages)."""
    names = ("layer.0.q", "layer.0.v")
    sent = {n: 0.0 for n in names}
    exact = {n: 0.0 for n in names}
    messages = []
    for t in range(rounds):
        seed = 11 if fixed else 100 + t
        updates = make_updates(seed, 8, 7, [2, 4, 3], [16.0, 8.0, 4.0], modules=names)
        weights = [3, 5, 2] if fixed else [1 + t, 2, 3]
        out = aggregate("svd", updates, weights, rank=rank, error_feedback=True, state=state)
        messages.append(out)
        for n in names:
            sent[n] = sent[n] + dense(out[n])
            exact[n] = exact[n] + exact_sum(updates, weights, n)
    return sent, exact, messages


@pytest.mark.parametrize("fixed", [True, False])
def test_error_feedback_loses_nothing(fixed):
    state = SvdErrorFeedback()
    sent, exact, messages = _rounds(state, 6, fixed)
    for out in messages:
        assert all(f.rank == 2 for f in out.values())
    for n in sent:
        residual = dense(state.residual(n)) if state.residual(n) is not None else 0.0
        assert rel_err(exact[n], sent[n] + residual) <= 1e-10
        assert state.residual_norm(n) == pytest.approx(np.linalg.norm(residual), rel=1e-9, abs=1e-12)
    assert state.rounds == 6


def test_error_feedback_converges_for_fixed_target():
    state = SvdErrorFeedback()
    rounds = 40
    sent, exact, _ = _rounds(state, rounds, fixed=True)
    for n in sent:
        target = exact[n] / rounds
        mean_sent = sent[n] / rounds
        without = aggregate("svd", make_updates(11, 8, 7, [2, 4, 3], [16.0, 8.0, 4.0]), [3, 5, 2], rank=2)
        plain_err = np.linalg.norm(target - dense(without[n]))
        assert np.linalg.norm(target - mean_sent) < 0.25 * plain_err


def test_error_feedback_state_dict_roundtrip():
    state = SvdErrorFeedback()
    _rounds(state, 3, fixed=False)
    snapshot = state.state_dict()
    for pair in snapshot["residuals"].values():
        assert isinstance(pair["A"], np.ndarray) and pair["A"].dtype == np.float64
        assert isinstance(pair["B"], np.ndarray) and pair["B"].dtype == np.float64
    restored = SvdErrorFeedback()
    restored.load_state_dict(snapshot)
    assert restored.rounds == state.rounds
    updates = make_updates(7, 8, 7, [2, 4, 3], [16.0, 8.0, 4.0])
    a = aggregate("svd", updates, [1, 2, 3], rank=2, state=state)
    b = aggregate("svd", updates, [1, 2, 3], rank=2, state=restored)
    for n in a:
        np.testing.assert_allclose(dense(a[n]), dense(b[n]), atol=1e-12)
        np.testing.assert_allclose(dense(state.residual(n)), dense(restored.residual(n)), atol=1e-12)


def test_error_feedback_residual_cap_is_lossy_but_bounded():
    state = SvdErrorFeedback(max_residual_rank=1)
    sent, exact, _ = _rounds(state, 4, fixed=False)
    for n in sent:
        assert state.residual(n).rank <= 1
        assert state.dropped_norm[n] > 0.0


def test_error_feedback_needs_state():
    updates = make_updates(0, 4, 4, [2, 2], [4.0, 4.0])
    with pytest.raises(ValueError, match="state"):
        aggregate("svd", updates, [1, 1], error_feedback=True)
