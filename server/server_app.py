"""fedlora ServerApp: federated LoRA fine-tuning rounds, results in ``output-dir/<run-name>/``.

Parses the run-config once (a bad key or value stops the run before round 1), builds
the initial adapter, runs the rounds through :class:`server.strategy.LoraStrategy`,
evaluates the global adapter on the task's held-out test set after every round and
writes metrics, the communication ledger and the adapter (peft format) as it goes.

After every round it also writes ``checkpoint.npz`` (:mod:`fedlora.checkpoint`); a run
started with ``resume=true`` continues from the last finished round of that checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedlora import privacy, runtime
from fedlora.adapters import adapter_state, factor_layout, is_factor_key, load_adapter_state
from fedlora.checkpoint import (
    Checkpoint,
    CheckpointError,
    config_differences,
    find_resumable,
    load_checkpoint,
    save_checkpoint,
)
from fedlora.comms import COLUMNS as COMMS_COLUMNS
from fedlora.comms import CommsLedger
from fedlora.config import ConfigError, check_paths
from fedlora.models import build_lora_model
from fedlora.protocol import with_overrides
from fedlora.quantization import ErrorFeedback
from fedlora.results import new_run_dir, save_adapter, write_csv, write_json
from fedlora.timing import RoundTimer
from fedlora.training import evaluate
from fedlora.wire import WireFormat, encoded_bytes, from_record, to_record

from .strategy import AuditError, LoraStrategy

log = logging.getLogger("fedlora")

IDENTIFY_TIMEOUT = 120.0  # seconds the nodes get to answer the identity query

PRIVACY_COLUMNS = ("round", "node", "mode", "noise_multiplier", "sample_rate", "steps",
                   "epsilon", "delta", "target_epsilon")

METRIC_COLUMNS = (
    "round", "train_loss", "test_loss", "test_accuracy", "fed_eval_loss", "fed_eval_accuracy",
    "clients_sampled", "clients_accepted", "clients_refused", "clients_dropped", "max_epsilon",
    "max_update_norm", "bytes_up", "bytes_down", "round_seconds", "elapsed_seconds",
)
# Only for causal-LM tasks (e.g. shakespeare), where test_accuracy is next-token accuracy.
PERPLEXITY_COLUMNS = ("test_perplexity", "fed_eval_perplexity")


def _setup_logging() -> None:
    if not any(getattr(h, "_fedlora", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s fedlora: %(message)s"))
        handler._fedlora = True  # type: ignore[attr-defined]
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def _perplexity(loss: float | None) -> float | None:
    """exp of a mean token loss (the federated one is example-weighted over clients)."""
    return None if loss is None or not math.isfinite(loss) else math.exp(min(loss, 700.0))


def main(grid: Grid, context: Context) -> None:
    """Run the federated fine-tuning described by the run-config."""
    _setup_logging()
    try:
        cfg = runtime.resolve_config(context.run_config)
        check_paths(cfg)
        run_federated(grid, cfg)
    except ConfigError as e:
        log.error("%s", e)
        raise SystemExit(f"fedlora: {e}") from None


def build_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp; ``overrides`` are merged over the run-config (for in-process runs)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        main(grid, with_overrides(context, overrides))

    return server_app


app = build_app()


def save_global_adapter(method, spec, model, global_state: dict, path: Path) -> None:
    """Save the global model as one peft LoRA adapter (for stack: base + stacked update).

    The server's own model holds it when the layout matches (only the adapter is saved,
    and the next evaluation reloads what it needs); a stacked adapter of another rank
    gets a model of its own.
    """
    rank, alpha, state = method.export(global_state)
    if (rank, alpha) != (spec.rank, spec.alpha):
        model = build_lora_model(dataclasses.replace(spec, rank=rank, alpha=alpha, freeze_a=False))
    load_adapter_state(model, state)
    save_adapter(model, path)


def write_report(run_dir: Path) -> None:
    """``report.html`` of the run so far; drawing it never stops the run."""
    from fedlora.report import write_report as render

    try:
        render([run_dir])
    except Exception as e:  # noqa: BLE001  (a plot that fails must not cost the run)
        log.warning("could not write %s: %s", run_dir / "report.html", e)


def open_checkpoint(cfg) -> tuple[Path, Checkpoint]:
    """The run folder and checkpoint that ``resume=true`` continues; ConfigError if there is
    none, or if it was made under a run-config that may not change within a run."""
    try:
        run_dir = find_resumable(cfg.output_dir, cfg.run_name)
        ckpt = load_checkpoint(run_dir)
    except CheckpointError as e:
        raise ConfigError("resume", True, f"a run to continue, but {e}") from None
    current = cfg.to_dict()
    for key in config_differences(ckpt.config, current):
        raise ConfigError(key, current.get(key),
                          f"{ckpt.config.get(key)!r} as in the checkpoint of {run_dir} (a "
                          "resumed run keeps it)")
    if cfg.dp_mode != "off" and ckpt.config.get("num-server-rounds") != cfg.num_server_rounds:
        raise ConfigError("num-server-rounds", cfg.num_server_rounds,
                          f"{ckpt.config.get('num-server-rounds')} as in the checkpoint of "
                          f"{run_dir}: with dp-mode = '{cfg.dp_mode}' the privacy budget was "
                          "calibrated for that many rounds")
    if ckpt.round > cfg.num_server_rounds:
        raise ConfigError("num-server-rounds", cfg.num_server_rounds,
                          f"at least {ckpt.round}, the rounds the checkpoint of {run_dir} "
                          "already finished")
    return run_dir, ckpt


def run_federated(grid: Grid, cfg) -> Path:
    """The round loop; returns the run folder."""
    t_start = time.perf_counter()
    torch.set_num_threads(runtime.choose_num_threads(cfg.client_num_threads))
    ckpt = None
    if cfg.resume:
        run_dir, ckpt = open_checkpoint(cfg)
    else:
        run_dir = new_run_dir(cfg.output_dir, cfg.run_name)
        if (run_dir / "metrics.json").exists():
            log.warning("%s already holds a run; it is replaced (resume=true continues it "
                        "instead)", run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", cfg.to_dict())
    log.info("fedlora run in %s: task=%s rounds=%d aggregator=%s lora-rank=%d", run_dir,
             cfg.task, cfg.num_server_rounds, cfg.aggregator, cfg.lora_rank)

    spec = runtime.model_spec(cfg)
    columns = METRIC_COLUMNS + (PERPLEXITY_COLUMNS if spec.causal_lm else ())
    method = runtime.method_for(cfg)
    model = build_lora_model(spec)
    state = adapter_state(model)
    layout = factor_layout(state)
    full_bytes = sum(p.numel() for p in model.parameters()) * 4
    wire = WireFormat.from_config(cfg)
    per_update = sum(encoded_bytes(int(v.size), wire.dtype, wire.block_size)
                     for k, v in state.items() if is_factor_key(k))
    log.info("adapter: %d LoRA modules, %d tensors; %s bytes of factors per message "
             "(full model: %s bytes, ratio %.5f)", len(layout), len(state), f"{per_update:,}",
             f"{full_bytes:,}", per_update / full_bytes)
    test_set = runtime.encoded_test_set(cfg)
    if test_set is None:
        log.info("no centralised test set for task '%s': only federated evaluation", cfg.task)

    ledger = CommsLedger(full_model_bytes=full_bytes, block_size=cfg.wire_block_size)
    strategy = LoraStrategy(
        method=method,
        template=state,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_nodes,
        wire=wire,
        seed=cfg.seed,
        ledger=ledger,
        foreign_keys=cfg.foreign_keys,
        max_update_norm=cfg.max_update_norm,
        max_num_examples=cfg.max_num_examples,
        central=privacy.server_hook(cfg),
        noise_norm_allowance=privacy.reply_norm_allowance(cfg, method.payload(state)),
        dp_on=cfg.dp_mode != "off",
    )
    for mechanism in privacy.parse_dp_mode(cfg.dp_mode):
        log.info("dp-mode '%s' protects: %s", mechanism.name, mechanism.neighbouring)
    fed_eval = cfg.fraction_evaluate > 0 and cfg.dp_mode == "off"
    if cfg.fraction_evaluate > 0 and not fed_eval:
        log.info("federated evaluation is off under dp-mode = '%s': the sites' validation "
                 "loss and accuracy would leave them un-noised (the centralised test set "
                 "is evaluated as usual)", cfg.dp_mode)
    strategy.summary()
    arrays: ArrayRecord = to_record(state)  # the global adapter: float32 at the server

    def central_eval(record: ArrayRecord):
        if test_set is None:
            return None
        method.load(model, method.evaluation_state(from_record(record)),
                    client_rank=cfg.lora_rank)
        return evaluate(model, test_set, batch_size=cfg.eval_batch_size)

    rows: list[dict] = []
    privacy_rows: list[dict] = []
    resumes: list[dict] = []
    first_round = 1
    if ckpt is None:
        res0 = central_eval(arrays)
        rows.append({"round": 0, "test_loss": res0 and res0.loss,
                     "test_accuracy": res0 and res0.accuracy,
                     "elapsed_seconds": time.perf_counter() - t_start})
        if spec.causal_lm:
            rows[-1]["test_perplexity"] = res0 and res0.perplexity
        if res0 is not None:
            log.info("[round 0/%d] initial adapter: test loss %.4f, test accuracy %.4f%s",
                     cfg.num_server_rounds, res0.loss, res0.accuracy,
                     f", test perplexity {res0.perplexity:.2f}" if spec.causal_lm else "")
    else:
        arrays = to_record(ckpt.global_state)
        if strategy.downlink_feedback is not None:
            strategy.downlink_feedback = ErrorFeedback(ckpt.wire_state)
        method.restore_state(ckpt.method_state, ckpt.extra.get("method", {}))
        if ckpt.rng_state:
            strategy.rng.bit_generator.state = ckpt.rng_state
        rows, privacy_rows = list(ckpt.rows), list(ckpt.privacy_rows)
        ledger.restore(ckpt.comms_rows)
        resumes = list(ckpt.extra.get("resumes", []))
        if strategy.central is not None:  # the server's user-level ledger, never reset
            strategy.central.load_state_dict(ckpt.extra.get("central-dp"))
        first_round = ckpt.round + 1
        t_start -= float(rows[-1].get("elapsed_seconds") or 0.0) if rows else 0.0
        res = central_eval(arrays)
        recorded = rows[-1].get("test_accuracy") if rows else None
        resumes.append({"after_round": ckpt.round, "at": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "test_accuracy": res.accuracy if res else None,
                        "test_loss": res.loss if res else None})
        log.info("resuming %s after round %d of %d (from its checkpoint): the round-%d adapter "
                 "has test accuracy %s (recorded then: %s); rounds %d-%d to go", run_dir,
                 ckpt.round, cfg.num_server_rounds, ckpt.round, _fmt(res and res.accuracy),
                 _fmt(recorded), first_round, cfg.num_server_rounds)

    def write_results() -> None:
        # metrics.json last: once it shows a round, every other file has that round too.
        write_csv(run_dir / "metrics.csv", rows, columns)
        write_csv(run_dir / "comms.csv", ledger.rows(), COMMS_COLUMNS)
        write_json(run_dir / "comms.json", ledger.summary())
        if cfg.dp_mode != "off":
            write_csv(run_dir / "privacy.csv", privacy_rows, PRIVACY_COLUMNS)
        write_json(run_dir / "metrics.json", {"config": cfg.to_dict(), "rounds": rows,
                                              "comms": ledger.summary(), "resumes": resumes})

    def write_checkpoint(rnd: int) -> None:
        method_arrays, method_values = method.checkpoint_state()
        save_checkpoint(run_dir, Checkpoint(
            round=rnd, config=cfg.to_dict(), global_state=from_record(arrays),
            method_state=method_arrays, rng_state=strategy.rng.bit_generator.state,
            wire_state=(strategy.downlink_feedback.state()
                        if strategy.downlink_feedback is not None else {}),
            rows=rows, comms_rows=ledger.rows(), privacy_rows=privacy_rows,
            extra={"method": method_values, "resumes": resumes,
                   **({"central-dp": strategy.central.state_dict()}
                      if strategy.central is not None else {})}))

    if first_round > cfg.num_server_rounds:
        log.info("%s already finished all %d rounds; nothing to do", run_dir,
                 cfg.num_server_rounds)
    # A resumed run tells clients after which round it resumed: a client whose privacy
    # ledger did not survive the restart charges those rounds (fedlora.privacy.Ledger).
    train_config = ConfigRecord({"resumed-after": ckpt.round if ckpt is not None else 0})
    timeout = cfg.round_timeout or None
    if first_round <= cfg.num_server_rounds:
        # Stable sampling order across runs: nodes by their partition-id, not Flower's ids.
        strategy.identify_nodes(grid, timeout=cfg.round_timeout or IDENTIFY_TIMEOUT)
    for rnd in range(first_round, cfg.num_server_rounds + 1):
        timer = RoundTimer()
        with timer.phase("train_exchange"):
            replies = grid.send_and_receive(
                messages=strategy.configure_train(rnd, arrays, train_config, grid),
                timeout=timeout)
        try:
            with timer.phase("aggregation"):
                new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
        except AuditError:
            write_results()  # keep the ledger that shows the offending key; earlier rounds stay
            raise
        if new_arrays is not None:
            arrays = new_arrays
        fed = res = None
        evaluating = rnd % cfg.evaluate_every == 0 or rnd == cfg.num_server_rounds
        if fed_eval and evaluating:
            with timer.phase("eval_exchange"):
                ev_replies = grid.send_and_receive(
                    messages=strategy.configure_evaluate(rnd, arrays, train_config, grid),
                    timeout=timeout)
                fed = strategy.aggregate_evaluate(rnd, ev_replies)
        if evaluating:
            with timer.phase("central_eval"):
                res = central_eval(arrays)
        outcome = strategy.last_outcome
        timer.add_clients(outcome.metrics)
        totals = ledger.round_totals(rnd)
        for node, p in outcome.privacy:
            privacy_rows.append({
                "round": rnd, "node": node, "mode": p.get("mode", cfg.dp_mode),
                "noise_multiplier": p.get("noise-multiplier"), "sample_rate": p.get("sample-rate"),
                "steps": p.get("steps"), "epsilon": p.get("epsilon"), "delta": p.get("delta"),
                "target_epsilon": p.get("target-epsilon"),
            })
        spent = [p["epsilon"] for _, p in outcome.privacy if "epsilon" in p]
        row = {
            "round": rnd,
            "train_loss": train_metrics.get("train-loss") if train_metrics else None,
            "test_loss": res.loss if res else None,
            "test_accuracy": res.accuracy if res else None,
            "fed_eval_loss": fed.get("eval-loss") if fed else None,
            "fed_eval_accuracy": fed.get("eval-accuracy") if fed else None,
            "clients_sampled": outcome.sampled,
            "clients_accepted": len(outcome.accepted),
            "clients_refused": len(outcome.refused),
            "clients_dropped": len(outcome.dropped),
            "max_epsilon": max(spent) if spent else None,
            "max_update_norm": max(outcome.update_norms) if outcome.update_norms else None,
            "refused": [{"node": strategy.public_node(n), "reason": r}
                        for n, r in outcome.refused],
            "dropped": [{"node": strategy.public_node(n), "reason": r}
                        for n, r in outcome.dropped],
            "bytes_up": totals["up"],
            "bytes_down": totals["down"],
            "round_seconds": None,  # set once the round's files are written
            "elapsed_seconds": None,
        }
        if spec.causal_lm:
            row["test_perplexity"] = res.perplexity if res else None
            row["fed_eval_perplexity"] = _perplexity(fed.get("eval-loss")) if fed else None
        rows.append(row)
        # The checkpoint (with the round's privacy spend) first: a crash after it resumes
        # after this round, so no round is ever released twice on one charge.
        with timer.phase("writing"):
            write_checkpoint(rnd)
            save_global_adapter(method, spec, model, from_record(arrays), run_dir / "adapter")
            write_results()
            write_report(run_dir)
        row["timing"] = timer.breakdown()
        row["round_seconds"] = row["timing"]["total"]
        row["elapsed_seconds"] = time.perf_counter() - t_start
        write_checkpoint(rnd)  # again, now with the round's timing (a few milliseconds)
        write_results()
        log.info("[round %d/%d] time: %s", rnd, cfg.num_server_rounds, timer.line(row["timing"]))
        log.info(
            "[round %d/%d] train loss %s | test loss %s, accuracy %s%s | fed-eval accuracy %s | "
            "clients %d/%d (%d refused, %d dropped)%s | up %s B, down %s B | %.1f s",
            rnd, cfg.num_server_rounds, _fmt(row["train_loss"]), _fmt(row["test_loss"]),
            _fmt(row["test_accuracy"]),
            f", perplexity {_fmt(row['test_perplexity'], '.2f')}" if spec.causal_lm else "",
            _fmt(row["fed_eval_accuracy"]),
            len(outcome.accepted), outcome.sampled, len(outcome.refused), len(outcome.dropped),
            "" if not spent else f" | max epsilon {max(spent):.3f} (target {cfg.target_epsilon})",
            f"{totals['up']:,}", f"{totals['down']:,}", row["round_seconds"],
        )

    write_results()
    write_report(run_dir)
    final = rows[-1]
    log.info("done in %.1f s: test accuracy %s -> %s%s over %d rounds; %s bytes up, %s bytes "
             "down; results in %s (adapter: %s, report: report.html)",
             time.perf_counter() - t_start, _fmt(rows[0].get("test_accuracy")),
             _fmt(final.get("test_accuracy")),
             f" (perplexity {_fmt(rows[0].get('test_perplexity'), '.2f')} -> "
             f"{_fmt(final.get('test_perplexity'), '.2f')})" if spec.causal_lm else "",
             cfg.num_server_rounds,
             f"{ledger.summary()['total_bytes']['up']:,}",
             f"{ledger.summary()['total_bytes']['down']:,}", run_dir, run_dir / "adapter")
    return run_dir
