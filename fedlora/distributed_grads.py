"""A site's vector in a distributed DP-SGD round (``dp-mode = "sample"`` with
``secure-aggregation = true``): the clipped per-example gradients of its examples, scaled,
rounded and summed, with the count appended (:class:`fedlora.privacy.skellam.SkellamSum`),
before the noise share :func:`fedlora.distributed_dp.noised` adds.

* A probe round steps the head: the site reads what the head reads (the encoder once) and
  takes every example's gradient of the head with ``torch.func`` (:func:`site_vector`).
* A LoRA round steps every tensor the aggregator sends (the LoRA factors and the head):
  every example's gradient through the whole model, Opacus' per-example gradients
  (:func:`lora_step_vector`). Every example of the site takes part (a full-batch step:
  q = 1, what the ledger charges), dropout off, every example padded to the run's
  ``max-length`` (within the model's own limit) so that it is computed at the same width
  whatever else is in its chunk (a chunk's size still varies: its last bits may).
  The per-example argument assumes a model whose examples do not interact (no layer mixes
  the examples of a batch, no random layer drop): the packaged models are such.

Both take :data:`CHUNK` examples at a time (memory bounded by public settings, not by the
site's data). A chunk that fails for any reason is taken again one example at a time, and
an example that fails on its own, or whose gradient is not finite (a model the server
crafted to overflow on some inputs), adds no gradient but still counts: a failure changes
the sum by at most what one example could, and the site answers whatever its data hold (a
refusal would be a noiseless answer). A site's sum is clipped per coordinate to what
``max-num-examples`` examples can add (the modulus never depends on the data).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from opacus import GradSampleModule
from torch import nn
from torch.func import functional_call, grad, vmap

from .adapters import adapter_parameters, is_factor_key
from .dp_sgd import dropout_off, release_grad_samples
from .heads import head_module
from .privacy.skellam import SkellamSum
from .probe import features
from .training import trainable_parameters

if TYPE_CHECKING:
    from .run_config import RunConfig

__all__ = ["CHUNK", "example_gradients", "fixed_width", "lora_step_vector", "per_example",
           "per_example_grads", "site_vector", "step_vector"]

log = logging.getLogger("fedlora.client")

#: Examples per chunk.
CHUNK = 64


def _rows_finite(grads: np.ndarray) -> np.ndarray:
    """``grads`` with every row that has a non-finite entry set to zero."""
    grads[~np.isfinite(grads).all(axis=1)] = 0.0
    return grads


def _sum_chunks(indices: np.ndarray, spec: SkellamSum, clip: float,
                grads_of: Callable[[np.ndarray], np.ndarray], max_examples: int) -> np.ndarray:
    """The encoded, bounded sum over ``indices`` of ``grads_of(chunk)`` (rows of clipped,
    scaled, rounded per-example gradients), the count appended."""
    idx = np.asarray(indices, dtype=np.int64)
    total = np.zeros(spec.dims, dtype=np.int64)
    failed = 0
    for start in range(0, len(idx), CHUNK):
        part = idx[start:start + CHUNK]
        try:
            total += spec.encode(grads_of(part), clip)[:-1]
            continue
        except Exception:  # noqa: BLE001  (whatever it was: one example at a time)
            pass
        for one in part:
            try:
                total += spec.encode(grads_of(np.array([one])), clip)[:-1]
            except Exception:  # noqa: BLE001  (it adds no gradient; it still counts)
                failed += 1
    if failed:  # the details stay in this site's log
        log.error("Distributed DP: the gradients of %d examples could not be taken; they "
                  "count, with no gradient, this round", failed)
    vector = np.concatenate([total, [np.int64(spec.count_weight) * len(idx)]])
    return spec.bound_sum(vector, max_examples)


# -- a step of the head --------------------------------------------------------------------
def _head_names(head: nn.Module, keys: list[str]) -> list[str]:
    """The head's parameter names in adapter-key order (its shape only, never the data)."""
    names = [n for n, p in head.named_parameters() if p.requires_grad]
    out = []
    for key in keys:
        match = [n for n in names if key.endswith("." + n)]
        if len(match) != 1:
            raise ValueError(f"cannot match adapter key {key!r} to one head parameter")
        out.append(match[0])
    if sorted(out) != sorted(names):
        raise ValueError("the head's parameters and the adapter's head keys differ")
    return out


def per_example_grads(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor,
                      names: list[str]) -> np.ndarray:
    """``(n, dims)`` gradients of each example's cross-entropy, in ``names`` order; a row
    with a non-finite entry is zero."""
    params = {n: p.detach() for n, p in head.named_parameters()}

    def loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(head, p, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, y.unsqueeze(0))

    with dropout_off(head):
        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, feats, labels)
    return _rows_finite(torch.cat([g[n].reshape(len(labels), -1) for n in names], 1)
                        .double().cpu().numpy())


def site_vector(model: nn.Module, data: Any, indices: np.ndarray, *, cfg: RunConfig,
                payload: Mapping[str, Any], spec: SkellamSum,
                batch_size: int = 128) -> np.ndarray:
    """A probe round's vector: the head's clipped per-example gradients, summed, counted."""
    head = head_module(model)
    names = _head_names(head, sorted(k for k in payload if not is_factor_key(k)))

    def grads_of(idx: np.ndarray) -> np.ndarray:
        feats = features(model, data, idx, min(batch_size, CHUNK)).float()
        labels = data.labels[torch.as_tensor(idx)].to(feats.device)
        dtype = next(head.parameters()).dtype
        return per_example_grads(head, feats.to(dtype), labels, names)

    return _sum_chunks(indices, spec, float(cfg.max_grad_norm), grads_of,
                       int(cfg.max_num_examples))


# -- a step of every sent tensor ------------------------------------------------------------
@contextlib.contextmanager
def per_example(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` wrapped by Opacus for per-example gradients, dropout off; unwrapped after
    (the model is cached and serves other rounds)."""
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    gsm.train()
    try:
        with dropout_off(model):
            yield gsm
    finally:
        release_grad_samples(gsm, trainable_parameters(model))


def fixed_width(batch: dict[str, torch.Tensor], width: int,
                pad_id: int) -> dict[str, torch.Tensor]:
    """``batch`` padded to ``width`` tokens (a public setting, the run's ``max-length``): an
    example is then computed in the same shapes whatever else is in its chunk."""
    extra = width - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    out = dict(batch)
    out["input_ids"] = nn.functional.pad(batch["input_ids"], (0, extra), value=pad_id)
    out["attention_mask"] = nn.functional.pad(batch["attention_mask"], (0, extra), value=0)
    return out


def _grads_in(gsm: nn.Module, params: list[nn.Parameter], data: Any, idx: np.ndarray,
              width: int) -> np.ndarray:
    """One chunk's per-example gradients of ``params`` through the wrapped model ``gsm``."""
    batch = fixed_width(data.collate(idx), width, getattr(data, "pad_id", 0))
    batch = {k: v.to(params[0].device) for k, v in batch.items()}
    gsm(**batch).loss.backward()  # cross-entropy: a mean of per-example losses
    rows = []
    for p in params:
        sample = getattr(p, "grad_sample", None)
        if sample is not None and sample.shape[0] != len(idx):
            raise ValueError("per-example gradients of another batch size")
        rows.append(torch.zeros((len(idx), p.numel()), dtype=torch.float64) if sample is None
                    else sample.detach().reshape(len(idx), -1).double().cpu())
        p.grad_sample = None
    return _rows_finite(torch.cat(rows, 1).numpy())


def example_gradients(model: nn.Module, data: Any, idx: np.ndarray, keys: list[str],
                      width: int = 0) -> np.ndarray:
    """``(len(idx), dims)`` gradients of each example's loss with respect to the tensors of
    adapter keys ``keys`` (in that order), dropout off, every example padded to ``width``;
    a row with a non-finite entry is zero."""
    params = adapter_parameters(model, keys)
    with per_example(model) as gsm:
        return _grads_in(gsm, params, data, idx, width)


def lora_step_vector(model: nn.Module, data: Any, indices: np.ndarray, *, cfg: RunConfig,
                     payload: Mapping[str, Any], spec: SkellamSum) -> np.ndarray:
    """A LoRA round's vector: every sent tensor's clipped per-example gradients (sorted
    keys), summed, counted; the model wrapped once for the round."""
    params = adapter_parameters(model, sorted(payload))
    if sum(p.numel() for p in params) != spec.dims:
        raise ValueError("the sent tensors and the round's vector differ in size")
    width = int(getattr(data, "max_length", 0))
    with per_example(model) as gsm:
        return _sum_chunks(indices, spec, float(cfg.max_grad_norm),
                           lambda idx: _grads_in(gsm, params, data, idx, width),
                           int(cfg.max_num_examples))


def step_vector(model: nn.Module, data: Any, indices: np.ndarray, *, cfg: RunConfig,
                payload: Mapping[str, Any], release: Any) -> np.ndarray:
    """The site's vector for a DP-SGD round's release (:class:`fedlora.distributed_dp.Release`):
    a step of the head or of every sent tensor."""
    if release.kind == "head-step":
        return site_vector(model, data, indices, cfg=cfg, payload=payload, spec=release.spec,
                           batch_size=cfg.eval_batch_size)
    return lora_step_vector(model, data, indices, cfg=cfg, payload=payload, spec=release.spec)
