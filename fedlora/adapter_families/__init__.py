"""Adapter families: the kind of trainable update attached to the frozen base (run-config
``adapter``), and LoRA's inits (run-config ``lora-init``).

Each family is one module declaring what a site sends, whether the mean of that is the mean
of the sites' updates, which inits it takes, and its peft config (:mod:`.base` holds the
class and the one registry, :data:`FAMILIES`). :mod:`.inits` has the inits, :mod:`.compat`
the checks of a run-config's family against its aggregator, init and secure aggregation.

A new family is one module defining its registered :class:`AdapterFamily` subclass, plus
one import line below.
"""

from .base import FAMILIES, AdapterFamily, available_families, get_family, register
from .inits import BASE_DERIVED, INITS, as_plain_lora, derives_base, peft_init

# Importing the family modules registers them; this order is the order of FAMILIES.
from . import lora as _lora  # noqa: E402,F401  isort: skip
from . import dora as _dora  # noqa: E402,F401  isort: skip
from . import vera as _vera  # noqa: E402,F401  isort: skip
from . import c3a as _c3a  # noqa: E402,F401  isort: skip
from .compat import check_config, other_tensors  # noqa: E402

__all__ = [
    "BASE_DERIVED",
    "FAMILIES",
    "INITS",
    "AdapterFamily",
    "SENT_SUFFIXES",
    "as_plain_lora",
    "available_families",
    "check_config",
    "derives_base",
    "get_family",
    "is_adapter_parameter",
    "other_tensors",
    "peft_init",
    "register",
]

#: Every key suffix some registered family sends (besides a head).
SENT_SUFFIXES: tuple[str, ...] = tuple(dict.fromkeys(s for f in FAMILIES.values()
                                                      for s in f.sends))


def is_adapter_parameter(name: str) -> bool:
    """Whether the parameter ``name`` of a peft model belongs to any family's adapter."""
    return any(f.is_own_parameter(name) for f in FAMILIES.values())
