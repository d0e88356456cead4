"""The rebuild-per-message baseline: a ClientApp that builds everything anew for every
train message, the pattern of Flower's examples."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp


def rebuild_train(msg: Message, context: Context) -> Message:
    """One train message handled the way Flower's examples do: everything built anew.

    Only the raw text pool stays cached in the process (as the examples keep their
    ``FederatedDataset`` in a global); the model, adapter, tokenizer, tokenised partition,
    data loader, optimiser and PrivacyEngine are created for this message and dropped after.
    """
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from fedlora import aggregation, privacy
    from fedlora.data import CausalLMDataset, EncodedDataset, train_val_split
    from fedlora.models import (
        cast_frozen_base,
        choose_num_threads,
        head_name,
        resolve_base_dtype,
        resolve_device,
    )
    from fedlora.protocol import CONFIG_KEY, LORA_KEY, METRICS_KEY, STATUS_KEY, NodeInfo
    from fedlora.runtime import VAL_FRACTION, parse_run_config
    from fedlora.tasks import TASKS, client_dataset, get_task
    from fedlora.wire import from_record, to_record

    t0 = time.perf_counter()
    cfg = parse_run_config(context.run_config, known_tasks=TASKS,
                           known_aggregators=aggregation.METHODS)
    if cfg.dp_mode not in ("off", "sample"):
        raise ValueError(f"the rebuild baseline runs dp-mode off or sample, not {cfg.dp_mode!r}")
    torch.set_num_threads(choose_num_threads(cfg.client_num_threads))  # as fedlora's client
    node = NodeInfo.from_node_config(context.node_config, cfg)
    pid = node.partition_id or 0
    task = get_task(cfg.task)
    model_path = task.model_path(cfg)
    rank = node.lora_rank or cfg.lora_rank
    method = aggregation.get_method(cfg.aggregator, alpha=cfg.lora_alpha, rank=cfg.lora_rank,
                                    error_feedback=cfg.svd_error_feedback)

    # The model: re-instantiated from its folder, with a new LoRA adapter of the run's spec.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(cfg.seed)
    if task.causal_lm:
        base = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True)
        base.config.use_cache = False
    else:
        base = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=len(task.label_names(cfg)), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    if base.config.pad_token_id is None:
        base.config.pad_token_id = tok.pad_token_id
    head = None if task.causal_lm else head_name(base)
    model = get_peft_model(base, LoraConfig(
        r=rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        modules_to_save=[head] if cfg.train_head and head else None,
        task_type="CAUSAL_LM" if task.causal_lm else None))
    if method.freeze_a:
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    device = resolve_device(cfg.device)
    base_dtype = resolve_base_dtype(cfg.base_dtype, device)
    if base_dtype != "float32":  # as fedlora's models.build_lora_model
        cast_frozen_base(model, getattr(torch, base_dtype))
    model.to(device)  # as Flower's examples: net.to(device)
    method.load(model, from_record(msg.content[LORA_KEY]), client_rank=rank)

    # The data: this client's partition, tokenised for this message.
    texts = client_dataset(cfg, partition_id=node.partition_id,
                           num_partitions=node.num_partitions, data_path=node.data_path)
    enc = (CausalLMDataset if task.causal_lm else EncodedDataset)(texts, tok, cfg.max_length)
    train_idx, _ = train_val_split(len(enc), VAL_FRACTION, cfg.seed + pid)
    server_round = int(msg.content[CONFIG_KEY].get("server-round", 0))
    seed = cfg.seed * 1_000_003 + server_round * 7919 + pid
    # Items are 1-tuples (Opacus' Poisson loader reads the structure of an item); a batch is
    # padded to its longest row, as in fedlora's client.
    loader = DataLoader([(int(i),) for i in train_idx], batch_size=cfg.batch_size, shuffle=True,
                        collate_fn=lambda items: enc.collate([int(i) for (i,) in items]),
                        # DP-SGD's Poisson masks come from this generator: OS entropy then
                        generator=(privacy.private_torch_generator() if cfg.dp_mode == "sample"
                                   else torch.Generator().manual_seed(seed)))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    metrics: dict[str, Any] = {"num-examples": len(train_idx)}
    engine = None
    if cfg.dp_mode == "sample":
        from opacus import PrivacyEngine

        plan = privacy.plan_for(cfg, len(train_idx))  # same noise multiplier as fedlora's client
        engine = PrivacyEngine(accountant=cfg.accountant)
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=plan.noise_multiplier, max_grad_norm=cfg.max_grad_norm,
            noise_generator=privacy.private_torch_generator(device))
        metrics.update({"dp-noise-multiplier": plan.noise_multiplier,
                        "dp-sample-rate": 1.0 / len(loader), "dp-delta": cfg.target_delta})

    # local-steps optimiser steps, cycling over the loader.
    model.train()
    losses: list[float] = []
    steps = 0
    while steps < cfg.local_steps:
        for batch in loader:
            if steps >= cfg.local_steps:
                break
            steps += 1
            if batch["labels"].numel() == 0:  # an empty Poisson batch: nothing to learn from
                continue
            out = model(**{k: v.to(device) for k, v in batch.items()})
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(out.loss.item()))
    reply = method.reply(model)
    if engine is not None:
        # This message's steps only: a new engine per message never composes across rounds.
        metrics.update({"dp-epsilon": engine.get_epsilon(cfg.target_delta), "dp-steps": steps})
    metrics.update({"train-loss": float(np.mean(losses)) if losses else float("nan"),
                    "train-steps": steps, "train-seconds": time.perf_counter() - t0})
    return Message(content=RecordDict({
        LORA_KEY: to_record(reply, cfg.wire_dtype),
        METRICS_KEY: MetricRecord(metrics),
        STATUS_KEY: ConfigRecord({"status": "ok"}),
    }), reply_to=msg)


def build_rebuild_app(overrides: Mapping[str, Any] | None = None,
                      mods: list | None = None) -> ClientApp:
    """The rebuild-per-message ClientApp (train messages, and the identity query that
    orders sampling; run it with ``fraction-evaluate`` = 0)."""
    from fedlora.protocol import with_overrides

    app = ClientApp(mods=mods or [])

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return rebuild_train(msg, with_overrides(context, overrides))

    @app.query()
    def _query(msg: Message, context: Context) -> Message:  # as fedlora's: same sampling
        from fedlora.app.client.client_app import query_fn

        return query_fn(msg, context)

    return app
