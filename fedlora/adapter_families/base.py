"""The :class:`AdapterFamily` every adapter family subclasses, and the one registry of them.

An adapter family is the kind of trainable update peft attaches to the frozen base (LoRA,
DoRA, VeRA, ...). A family declares what a site sends (:attr:`AdapterFamily.sends`, key
suffixes of peft's portable state dict, besides a trained head), whether those tensors are
LoRA's ``A`` and ``B`` factors (:attr:`AdapterFamily.low_rank`, which the factor-based
aggregators need), whether the update of a layer is linear in what is sent
(:attr:`AdapterFamily.exact_mean`: the mean of what sites send is then exactly the mean of
their updates), whether DP-SGD can clip its per-example gradients, which ``lora-init``
values it takes, and the peft config it is built from.
Every party builds the same model from the same run-config, so whatever a family derives
from the base weights or a public seed is never sent.

A site loads the global state the same way for every family: the tensors it receives are
keyed by peft's portable state-dict names, which :func:`fedlora.adapters.load_adapter_state`
sets in its model (every one of the family's sent tensors and the head, no other). What is
not sent (VeRA's projections, the residual base of a PiSSA or OLoRA init) is already in the
site's model, derived when the model was built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from peft import PeftConfig

__all__ = ["FAMILIES", "AdapterFamily", "available_families", "get_family", "register"]


class AdapterFamily:
    """One adapter family: its declarations (class attributes) and its peft config."""

    name: ClassVar[str] = ""
    #: Suffixes of the state-dict keys a site sends (the head's keys come on top).
    sends: ClassVar[tuple[str, ...]] = ()
    #: Substrings of the names of its parameters in a peft model (kept float32).
    markers: ClassVar[tuple[str, ...]] = ()
    #: What it sends is LoRA's A and B factors and nothing else besides the head.
    low_rank: ClassVar[bool] = False
    #: A layer's update is linear in what is sent: averaging what sites send is exact.
    exact_mean: ClassVar[bool] = False
    #: Why (or why not) :attr:`exact_mean`, quoted in the documentation and errors.
    exactness: ClassVar[str] = ""
    #: Opacus computes per-example gradients of its layers (``dp-mode`` sample needs them).
    per_example_gradients: ClassVar[bool] = False
    #: The run-config keys that shape its tensors (named when they do not fit a model).
    shaped_by: ClassVar[tuple[str, ...]] = ("lora-target-modules", "lora-rank")
    #: The ``lora-init`` values it accepts.
    inits: ClassVar[tuple[str, ...]] = ("default",)

    @classmethod
    def peft_config(cls, spec: Any, *, modules_to_save: list[str] | None,
                    task_type: str | None) -> PeftConfig:
        """The peft config that attaches this family to a base model per ``spec`` (a
        :class:`fedlora.models.LoraSpec`: rank, alpha, dropout, target modules, init, seed)."""
        raise NotImplementedError

    @classmethod
    def sent_keys(cls, state: Mapping[str, Any]) -> list[str]:
        """The keys of ``state`` that are this family's own tensors (not the head's)."""
        return sorted(k for k in state if k.endswith(cls.sends))

    @classmethod
    def is_own_parameter(cls, name: str) -> bool:
        """Whether the parameter ``name`` of a peft model belongs to this family's adapter."""
        return any(m in name for m in cls.markers)


#: The registered families: name -> :class:`AdapterFamily` subclass, in registration order.
FAMILIES: dict[str, type[AdapterFamily]] = {}
F = TypeVar("F", bound=type[AdapterFamily])


def register(cls: F) -> F:
    """Class decorator registering an adapter family under ``cls.name`` (``ValueError`` for
    a missing or repeated name, or a family that declares nothing it sends)."""
    if not isinstance(cls.name, str) or not cls.name:
        raise ValueError(f"adapter family {cls.__name__} needs a non-empty string name")
    if cls.name in FAMILIES:
        raise ValueError(f"adapter family {cls.name!r} is already registered "
                         f"(by {FAMILIES[cls.name].__module__})")
    if not cls.sends or not cls.markers:
        raise ValueError(f"adapter family {cls.name!r} declares no sends or markers")
    FAMILIES[cls.name] = cls
    return cls


def available_families() -> tuple[str, ...]:
    """Names of the registered families, in registration order."""
    return tuple(FAMILIES)


def get_family(name: str) -> type[AdapterFamily]:
    """The family registered as ``name`` (``ValueError`` listing the families otherwise)."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown adapter family {name!r}; available: "
                         f"{', '.join(available_families())}") from None
