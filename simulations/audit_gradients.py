"""What the canary audit's auditor computes (``simulations.audit_privacy``): the canaries,
and every example's loss gradient over the released tensors it scores.

The gradients are taken with dropout off (:func:`fedlora.dp_sgd.dropout_off`), as the
private mechanisms train: the model itself keeps its configured dropout. In the LoRA
phase they cover the adapter's trained tensors; in the probe phase only the
classification head's, on the rows the head reads (the encoder's output, which a probe
round does not change).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

__all__ = ["CANARY_WORDS", "concat", "flat", "guess_sizes", "head_gradients", "key_params",
           "make_canaries", "per_example_gradients"]

CANARY_WORDS = 8  # words per canary text
GRAD_BATCH = 32  # examples per per-example-gradient pass


def make_canaries(tokenizer, count: int, label_names: tuple[str, ...],
                  rng: np.random.Generator):
    """``count`` different texts of :data:`CANARY_WORDS` random whole-word vocabulary
    entries, each with a random label (a :class:`~fedlora.data.TextDataset`)."""
    from fedlora.data import TextDataset

    special = set(tokenizer.all_special_tokens)
    words = sorted(w for w in tokenizer.get_vocab()
                   if w.isascii() and w.isalpha() and len(w) > 2 and w not in special)
    texts: list[str] = []
    seen: set[str] = set()
    while len(texts) < count:
        text = " ".join(rng.choice(words, CANARY_WORDS))
        if text not in seen:
            seen.add(text)
            texts.append(text)
    labels = rng.integers(0, max(2, len(label_names)), count)
    return TextDataset(texts, labels.astype(np.int64), ["canary"] * count, label_names)


def concat(a, b):
    """Two TextDatasets one after the other."""
    from fedlora.data import TextDataset

    return TextDataset(a.texts + b.texts, np.concatenate([a.labels, b.labels]),
                       a.groups + b.groups, a.label_names)


def key_params(model, *, head_only: bool = False) -> list[tuple[str, Any, int]]:
    """The adapter keys (the order of :func:`fedlora.adapters.adapter_state`), each with
    the trainable parameter behind it (None: a tensor that does not train) and its size;
    ``head_only``: only the classification head's keys."""
    from peft import get_peft_model_state_dict

    from fedlora.heads import head_module
    from fedlora.training import trainable_parameters

    by_ptr = {p.data_ptr(): p for p in trainable_parameters(model)}
    rows = [(k, by_ptr.get(t.data_ptr()), t.numel())
            for k, t in get_peft_model_state_dict(model).items()]
    if head_only:
        head = {p.data_ptr() for p in head_module(model).parameters()}
        rows = [row for row in rows if row[1] is not None and row[1].data_ptr() in head]
        if not rows:
            raise ValueError("the model has no trained classification head to audit")
    return rows


def per_example_gradients(model, data, indices: np.ndarray, keys) -> np.ndarray:
    """(n, d) float32: each example's loss gradient over the adapter, ``keys`` (from
    :func:`key_params`) in order, dropout off (no clipping:
    :func:`~fedlora.privacy.audit.canary_scores` uses directions only)."""
    import torch
    from opacus import GradSampleModule

    from fedlora.dp_sgd import dropout_off

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    gsm.train()
    rows = []
    try:
        with dropout_off(model):
            for start in range(0, len(indices), GRAD_BATCH):
                batch = data.collate(indices[start : start + GRAD_BATCH])
                with warnings.catch_warnings():  # Opacus' hooks on inputs that need no grad
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    gsm(**batch).loss.backward()
                n = len(batch["labels"])
                rows.append(torch.cat([
                    (p.grad_sample.reshape(n, -1) if p is not None else torch.zeros((n, size)))
                    .float().cpu() for _, p, size in keys], dim=1).numpy())
                for _, p, _ in keys:
                    if p is not None:
                        p.grad_sample, p.grad = None, None
    finally:
        gsm._close()  # remove the hooks before the mechanism wraps the model itself
        for _, p, _ in keys:
            if p is not None:
                for attr in ("grad_sample", "_forward_counter", "summed_grad"):
                    if hasattr(p, attr):
                        delattr(p, attr)
                p.grad = None
    return np.concatenate(rows)


def head_gradients(model, feats, labels, keys) -> np.ndarray:
    """(n, d) float32: each example's loss gradient over the head's tensors ``keys`` (from
    :func:`key_params` with ``head_only``), the head reading ``feats`` (n, ...) as a probe
    round trains it (cross-entropy), dropout off."""
    import torch
    from torch.func import functional_call, grad, vmap

    from fedlora.dp_sgd import dropout_off
    from fedlora.heads import head_module

    head = head_module(model)
    names = {p.data_ptr(): n for n, p in head.named_parameters()}
    params = {names[p.data_ptr()]: p.detach() for _, p, _ in keys}

    def loss(ps, x, y):
        logits = functional_call(head, ps, (x.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(logits, y.unsqueeze(0))

    with dropout_off(head):
        per = vmap(grad(loss), in_dims=(None, 0, 0), randomness="same")(params, feats, labels)
    n = len(labels)
    return torch.cat([per[names[p.data_ptr()]].reshape(n, -1).float() for _, p, _ in keys],
                     dim=1).cpu().numpy()


def flat(state: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    """The tensors of ``keys`` in ``state``, raveled one after the other (float64)."""
    return np.concatenate([np.asarray(state[k], dtype=np.float64).ravel() for k in keys])


def guess_sizes(num_canaries: int) -> list[tuple[int, int]]:
    """The guess sizes tried (fixed before any score is seen): k in and k out for k of
    1/16, 1/8, 1/4 and 3/8 of the canaries."""
    ks = sorted({max(1, num_canaries * f // 16) for f in (1, 2, 4, 6)})
    return [(k, k) for k in ks if 2 * k <= num_canaries]
