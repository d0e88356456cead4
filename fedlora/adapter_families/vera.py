"""VeRA: frozen random matrices shared by every layer, and two trained vectors per layer.

A layer adds ``diag(lambda_b) B diag(lambda_d) A`` where ``A`` (r x d_in) and ``B``
(d_out x r) are drawn once from peft's ``projection_prng_key``, which is the run's public
``seed``: every site and the server draw the same matrices and they are never sent (nor
saved: plain peft draws them again from the key in ``adapter_config.json``). A site sends
``lambda_b`` (d_out) and ``lambda_d`` (r) per layer, and the head.

The update is linear in ``lambda_b`` for a fixed ``lambda_d`` and in ``lambda_d`` for a fixed
``lambda_b``, but bilinear in the two: the mean of what sites send is the mean of their
updates exactly only where their ``lambda_d`` (or their ``lambda_b``) agree.
"""

from __future__ import annotations

from typing import Any

from peft import VeraConfig

from .base import AdapterFamily, register

__all__ = ["LAMBDA_B", "LAMBDA_D", "VeraFamily", "D_INITIAL"]

LAMBDA_B = ".vera_lambda_b"  # (d_out,), starts at zero: the adapter starts as no change
LAMBDA_D = ".vera_lambda_d"  # (r,)
D_INITIAL = 0.1  # lambda_d's initial value (peft's default)


@register
class VeraFamily(AdapterFamily):
    """Two scaling vectors per layer on shared, seeded random projections."""

    name = "vera"
    sends = (LAMBDA_B, LAMBDA_D)
    markers = ("vera_lambda_b", "vera_lambda_d")
    low_rank = False
    exact_mean = False
    exactness = ("the update diag(lambda_b) B diag(lambda_d) A is bilinear in the two sent "
                 "vectors: exact where the sites' lambda_d agree, not in general")
    inits = ("default",)

    @classmethod
    def peft_config(cls, spec: Any, *, modules_to_save: list[str] | None,
                    task_type: str | None) -> VeraConfig:
        return VeraConfig(
            r=spec.rank,
            target_modules=list(spec.target_modules),
            projection_prng_key=spec.init_seed,
            save_projection=False,
            vera_dropout=spec.dropout,
            d_initial=D_INITIAL,
            modules_to_save=modules_to_save,
            task_type=task_type,
        )
