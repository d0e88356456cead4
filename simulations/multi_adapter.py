"""Several clients' adapters trained at once, in one batched pass over a shared frozen base.

The frozen base model is the same for every virtual client; only the LoRA factors (and a
trained head) differ. :func:`train_batched` concatenates the mini-batches of k clients into
one batch, runs the frozen base once over it, and inside every LoRA layer (and the head)
applies client j's own factors to client j's rows. The loss is the sum of the clients' own
mean losses, so each client's factors receive exactly the gradient of its own mini-batch,
and AdamW or SGD, which update each tensor on its own, give every client what its own
optimiser would. With dropout off the result equals k separate calls of
:func:`fedlora.training.train` up to floating-point rounding (``tests/test_multi_adapter.py``).

Non-private training only: DP-SGD's per-example clipping is not implemented for these
layers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from peft.utils.other import ModulesToSaveWrapper
from torch import nn
from torch.nn import functional as F

from fedlora.adapters import adapter_state, load_adapter_state
from fedlora.data import CausalLMDataset, EncodedDataset
from fedlora.training import TrainResult, _to, make_optimizer, minibatches, model_device

__all__ = ["train_batched"]

ADAPTER = "default"  # peft's adapter name in fedlora's models


@dataclass
class _Slots:
    """The per-client copies of the adapter tensors, and how the current batch is split."""

    k: int
    sizes: list[int] = field(default_factory=list)  # rows of each client in the batch
    tensors: dict[nn.Parameter, list[nn.Parameter]] = field(default_factory=dict)

    def add(self, original: nn.Parameter) -> None:
        self.tensors[original] = []

    def of(self, original: nn.Parameter) -> list[nn.Parameter]:
        return self.tensors[original]

    def trainable(self) -> list[nn.Parameter]:
        return [p for copies in self.tensors.values() for p in copies if p.requires_grad]


def _lora_forward(module: nn.Module, slots: _Slots):
    base, lora_a = module.base_layer, module.lora_A[ADAPTER]
    lora_b, drop = module.lora_B[ADAPTER], module.lora_dropout[ADAPTER]
    scaling = module.scaling[ADAPTER]
    a_copies, b_copies = slots.of(lora_a.weight), slots.of(lora_b.weight)

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = base(x, *args, **kwargs)
        parts = x.to(a_copies[0].dtype).split(slots.sizes)
        delta = torch.cat([F.linear(F.linear(drop(xj), a), b) * scaling
                           for xj, a, b in zip(parts, a_copies, b_copies)])
        return (result + delta).to(result.dtype)

    return forward


def _head_forward(module: nn.Module, slots: _Slots):
    head = module.modules_to_save[ADAPTER]
    if not isinstance(head, nn.Linear):
        raise ValueError(f"batched training supports a linear head, not {type(head).__name__}")
    weights = slots.of(head.weight)
    biases = slots.of(head.bias) if head.bias is not None else [None] * slots.k

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        parts = x.to(weights[0].dtype).split(slots.sizes)
        return torch.cat([F.linear(xj, w, b) for xj, w, b in zip(parts, weights, biases)])

    return forward


def _adapter_modules(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    loras, heads = [], []
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            heads.append(module)
        elif hasattr(module, "base_layer") and ADAPTER in getattr(module, "lora_A", {}):
            loras.append(module)
    return loras, heads


@contextlib.contextmanager
def _batched(model: nn.Module, states: Sequence[Mapping[str, np.ndarray]]) -> Iterator[_Slots]:
    """The model's LoRA layers and head, temporarily serving ``len(states)`` clients."""
    loras, heads = _adapter_modules(model)
    if not loras:
        raise ValueError("the model has no LoRA layers to batch")
    slots = _Slots(k=len(states))
    originals = [m.lora_A[ADAPTER].weight for m in loras] + [m.lora_B[ADAPTER].weight
                                                             for m in loras]
    for m in heads:
        originals += [p for p in m.modules_to_save[ADAPTER].parameters()]
    for p in originals:
        slots.add(p)
    for state in states:  # each client's tensors, as peft loads them
        load_adapter_state(model, state)
        for p in originals:
            slots.of(p).append(nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
    patched = [(m, _lora_forward(m, slots)) for m in loras]
    patched += [(m, _head_forward(m, slots)) for m in heads]
    for m, forward in patched:
        m.forward = forward
    try:
        yield slots
    finally:
        for m, _ in patched:
            del m.forward


def _client_states(model: nn.Module, slots: _Slots) -> list[dict[str, np.ndarray]]:
    """Each client's adapter, read back with peft's own keys."""
    out = []
    with torch.no_grad():
        for j in range(slots.k):
            for original, copies in slots.tensors.items():
                original.copy_(copies[j])
            out.append(adapter_state(model))
    return out


def _losses(model: nn.Module, batch: Mapping[str, torch.Tensor], sizes: list[int],
            causal_lm: bool) -> list[torch.Tensor]:
    """Each client's mean loss over its own rows (per token for a causal LM, as
    transformers computes it)."""
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    losses = []
    for lj, yj in zip(logits.split(sizes), labels.split(sizes)):
        if causal_lm:
            lj, yj = lj[:, :-1].float(), yj[:, 1:]
            losses.append(F.cross_entropy(lj.reshape(-1, lj.shape[-1]), yj.reshape(-1),
                                          ignore_index=-100))
        else:
            losses.append(F.cross_entropy(lj.float(), yj))
    return losses


def train_batched(
    model: nn.Module,
    states: Sequence[Mapping[str, np.ndarray]],
    data: Sequence[EncodedDataset],
    indices: Sequence[Sequence[int] | np.ndarray],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float = 0.0,
    seeds: Sequence[int],
    optimizer: str = "adamw",
) -> tuple[list[dict[str, np.ndarray]], list[TrainResult]]:
    """Train k clients' adapters at once on the shared frozen ``model``.

    Client j starts from ``states[j]`` and trains ``steps`` mini-batches of ``batch_size``
    drawn from ``indices[j]`` of ``data[j]`` exactly as :func:`fedlora.training.train`
    draws them with seed ``seeds[j]``. Returns the k trained adapter states (peft keys, as
    :func:`fedlora.adapters.adapter_state`) and the k training results. The model's own
    adapter tensors are left holding the last client's; callers load what they need next.
    """
    k = len(states)
    if not (k == len(data) == len(indices) == len(seeds)) or k == 0:
        raise ValueError(f"one state, dataset, index list and seed per client: got {k}, "
                         f"{len(data)}, {len(indices)}, {len(seeds)}")
    causal = [isinstance(d, CausalLMDataset) for d in data]
    if len(set(causal)) != 1:
        raise ValueError("all clients must have the same kind of data")
    idx = [np.asarray(i, dtype=np.int64) for i in indices]
    if any(len(i) == 0 for i in idx):
        raise ValueError("no training examples for a client")
    device = model_device(model)
    draws = [minibatches(i, batch_size, steps, np.random.default_rng(s))
             for i, s in zip(idx, seeds)]
    losses: list[list[float]] = [[] for _ in range(k)]
    seen = [0] * k
    model.train()
    with _batched(model, states) as slots:
        opt = make_optimizer(optimizer, slots.trainable(), learning_rate=learning_rate,
                             weight_decay=weight_decay)
        for _ in range(steps):
            picks = [next(d) for d in draws]
            parts = [d.collate(p) for d, p in zip(data, picks)]
            batch = _to(_concat(parts, pad_id=data[0].pad_id), device)
            slots.sizes = [len(p) for p in picks]
            per_client = _losses(model, batch, slots.sizes, causal[0])
            torch.stack(per_client).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            for j, loss in enumerate(per_client):
                losses[j].append(float(loss.item()))
                seen[j] += len(picks[j])
        trained = _client_states(model, slots)
    results = [TrainResult(loss=float(np.mean(ls)) if ls else math.nan, steps=steps,
                           examples=n) for ls, n in zip(losses, seen)]
    return trained, results


def _concat(parts: Sequence[Mapping[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenate collated batches along rows, right-padding to the widest (padding is
    masked, so every row computes what it computes in its own batch)."""
    width = max(p["input_ids"].shape[1] for p in parts)
    out: dict[str, list[torch.Tensor]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for p in parts:
        extra = width - p["input_ids"].shape[1]
        out["input_ids"].append(F.pad(p["input_ids"], (0, extra), value=pad_id))
        out["attention_mask"].append(F.pad(p["attention_mask"], (0, extra), value=0))
        labels = p["labels"]
        if labels.dim() == 2:  # causal LM: per-token targets, -100 on padding
            labels = F.pad(labels, (0, extra), value=-100)
        out["labels"].append(labels)
    return {key: torch.cat(v) for key, v in out.items()}
