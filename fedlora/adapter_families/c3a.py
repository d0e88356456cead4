"""C3A: a block-circulant update per layer, applied as circular convolutions.

A layer's update is ``C(w) / d_in``, where ``C(w)`` is the block-circulant matrix of the
kernel ``w`` (``d_out/b x d_in/b`` blocks of size ``b``, run-config ``c3a-block-size``, which
must divide every adapted layer's input and output width). A site sends the kernel
(``*.c3a_kernel``, ``d_out * d_in / b`` numbers per layer). The update is linear in the
kernel, so the mean of the sites' kernels is exactly the mean of their updates: plain
averaging has no product error. The kernel starts at zero at every party (the adapter
starts as no change; the gradient of a linear map is not zero there).
"""

from __future__ import annotations

from typing import Any

from peft import C3AConfig

from .base import AdapterFamily, register

__all__ = ["C3aFamily", "KERNEL"]

KERNEL = ".c3a_kernel"  # (d_out / b, d_in / b, b)


@register
class C3aFamily(AdapterFamily):
    """One circulant kernel per adapted layer."""

    name = "c3a"
    sends = (KERNEL,)
    markers = ("c3a_kernel",)
    low_rank = False
    exact_mean = True
    exactness = "the update C(w) / d_in is linear in the sent kernel w"
    inits = ("default",)
    shaped_by = ("lora-target-modules", "c3a-block-size")

    @classmethod
    def peft_config(cls, spec: Any, *, modules_to_save: list[str] | None,
                    task_type: str | None) -> C3AConfig:
        return C3AConfig(
            block_size=spec.c3a_block_size,
            target_modules=list(spec.target_modules),
            modules_to_save=modules_to_save,
            task_type=task_type,
            init_weights=True,  # zeros
        )
