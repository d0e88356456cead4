"""``lora-init``: how LoRA's factors start, and what a data-free init does to the base.

``default`` is peft's own (Kaiming-uniform ``A``, zero ``B``: the adapter starts as no
change), ``gaussian`` draws ``A`` from a Gaussian of standard deviation ``1/r`` (``B``
zero). Both are drawn from the run's ``seed``, the same at every party. ``pissa`` and
``olora`` are derived from the base weights (PiSSA: the top ``r`` singular directions of
each adapted matrix; OLoRA: the first ``r`` columns of ``Q`` and rows of ``R`` of its QR
decomposition) and move that part out of the frozen base: a layer becomes ``W_res + s B A`` with ``W_res = W - s B0 A0``. The
decompositions are deterministic, so every site and the server derive the same ``A0``,
``B0`` and ``W_res`` from the same base and only the trained factors cross the wire.

A saved adapter is applied to the unchanged base by plain peft, so the server saves such a
run's adapter as an ordinary LoRA adapter of rank ``r + r0`` (:func:`as_plain_lora`): the
trained factors next to the initial ones with a negated ``B0``, which together add
``s B A - s0 B0 A0`` to ``W`` and so give the residual model the run trained.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..adapters import FACTOR_A, FACTOR_B, is_factor_key, module_of

__all__ = ["BASE_DERIVED", "INITS", "as_plain_lora", "derives_base", "peft_init"]

#: ``lora-init`` value -> peft's ``init_lora_weights``.
INITS: dict[str, bool | str] = {"default": True, "gaussian": "gaussian", "pissa": "pissa",
                                "olora": "olora"}
#: The inits that change the frozen base weights.
BASE_DERIVED = ("pissa", "olora")


def peft_init(init: str) -> bool | str:
    """peft's ``init_lora_weights`` for ``lora-init`` ``init`` (``ValueError`` naming it)."""
    try:
        return INITS[init]
    except KeyError:
        raise ValueError(f"lora-init {init!r}: expected one of {', '.join(INITS)}") from None


def derives_base(init: str) -> bool:
    """Whether ``init`` moves part of the base weights into the adapter."""
    return init in BASE_DERIVED


def as_plain_lora(state: Mapping[str, np.ndarray], initial: Mapping[str, np.ndarray], *,
                  rank: int, alpha: float, init_rank: int, init_alpha: float
                  ) -> tuple[int, float, dict[str, np.ndarray]]:
    """``(rank, alpha, state)`` of one LoRA adapter on the original base equal to ``state``
    (rank ``rank``, scale ``alpha / rank``) on the residual base of ``initial`` (rank
    ``init_rank``, scale ``init_alpha / init_rank``).

    Per module, ``A = [A; A0]`` and ``B = [B, -B0 s0 / s]`` at the combined rank with the
    scale ``s`` of ``state`` kept, so ``s B A = s B_t A_t - s0 B0 A0``. The other tensors
    (a trained head) are those of ``state``.
    """
    scale, init_scale = alpha / rank, init_alpha / init_rank
    out = {k: np.asarray(v) for k, v in state.items() if not is_factor_key(k)}
    modules = sorted({module_of(k) for k in state if is_factor_key(k)})
    for m in modules:
        a0, b0 = initial[m + FACTOR_A], initial[m + FACTOR_B]
        out[m + FACTOR_A] = np.concatenate([state[m + FACTOR_A], a0], axis=0).astype(np.float32)
        b0 = -np.asarray(b0, dtype=np.float64) * (init_scale / scale)
        out[m + FACTOR_B] = np.concatenate(
            [np.asarray(state[m + FACTOR_B], dtype=np.float64), b0], axis=1).astype(np.float32)
    total = rank + init_rank
    return total, scale * total, out
