"""SVD re-factorisation of the exact aggregate, with optional error feedback."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .. import aggregation
from .base import Method, State, register_method


@register_method
class SvdMethod(Method):
    """The exact weighted sum of client products B_k A_k, re-factorised to rank r (optimal),
    with the truncation residual optionally fed back into the next round."""

    name = "svd"
    linear = False  # the SVD of the mean of products B_k A_k

    def __post_init__(self) -> None:
        self.feedback = (aggregation.SvdErrorFeedback()
                         if self.options.get("error_feedback") else None)

    def checkpoint_state(self) -> tuple[State, dict[str, Any]]:
        if self.feedback is None:
            return {}, {}
        sd = self.feedback.state_dict()
        arrays = {f"residual/{m}/{which}": pair[which]
                  for m, pair in sd.pop("residuals").items() for which in ("A", "B")}
        return arrays, sd

    def restore_state(self, arrays: Mapping[str, np.ndarray], values: Mapping[str, Any]) -> None:
        if self.feedback is None:
            super().restore_state(arrays, values)
            return
        residuals: dict[str, dict[str, np.ndarray]] = {}
        for key, a in arrays.items():
            module, which = key[len("residual/"):].rsplit("/", 1)
            residuals.setdefault(module, {})[which] = a
        self.feedback.load_state_dict({**values, "residuals": residuals})

    def _options(self, global_state: State) -> dict[str, Any]:
        opts: dict[str, Any] = {"scale": self.scale, "rank": self.rank}
        if self.feedback is not None:
            opts.update(error_feedback=True, state=self.feedback)
        return opts
