"""The global adapter as the server saves it: one peft adapter that plain peft applies to
the unchanged base model (a run's ``adapter/`` folder, which :mod:`fedlora.export` reads).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from .adapter_families import as_plain_lora, derives_base
from .adapters import load_adapter_state
from .models import LoraSpec, build_lora_model, cached_lora_model, initial_adapter_state
from .results import save_adapter

if TYPE_CHECKING:
    from torch import nn

    from .aggregation import Method

__all__ = ["save_global_adapter"]


def save_global_adapter(method: Method, spec: LoraSpec, model: nn.Module, global_state: dict,
                        path: Path) -> None:
    """Save the global model as one peft adapter (for stack: base + stacked update) that
    plain peft applies to the unchanged base.

    The server's own model holds it when the layout matches (only the adapter is saved,
    and the next evaluation reloads what it needs); a stacked adapter of another rank
    gets a model of its own. Under an init that changes the base (``lora-init`` pissa or
    olora) the adapter is saved as plain LoRA on the original base, the initial factors
    beside the trained ones (:func:`fedlora.adapter_families.as_plain_lora`).
    """
    rank, alpha, state = method.export(global_state)
    if derives_base(spec.init):
        rank, alpha, state = as_plain_lora(state, initial_adapter_state(spec), rank=rank,
                                           alpha=alpha, init_rank=spec.rank,
                                           init_alpha=spec.alpha)
        model = cached_lora_model(dataclasses.replace(spec, rank=rank, alpha=alpha,
                                                      freeze_a=False, init="default"))
    elif (rank, alpha) != (spec.rank, spec.alpha):
        model = build_lora_model(dataclasses.replace(spec, rank=rank, alpha=alpha, freeze_a=False))
    load_adapter_state(model, state)
    save_adapter(model, path)
