"""fedlora ServerApp: federated LoRA fine-tuning rounds, results in ``output-dir/<run-name>/``.

Parses the run-config once (a bad key or value stops the run before round 1), builds
the initial adapter, runs the rounds through :class:`fedlora.app.server.strategy.LoraStrategy`,
evaluates the global adapter on the task's held-out test set after every round and
writes metrics, the communication log and the adapter (peft format) as it goes.

The loop reads in one screen: each round the strategy returns a
:class:`~fedlora.app.server.round_outcome.RoundOutcome` (user-level DP is a wrapper around the
strategy, :mod:`fedlora.app.server.user_level_strategy`), the centralised evaluation runs, and
:class:`~fedlora.app.server.run_record.RunRecord` writes the round's row, files and checkpoint.

After every round it also writes ``checkpoint.npz`` (:mod:`fedlora.checkpoint`); a run
started with ``resume=true`` continues from the last finished round of that checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedlora import privacy, runtime
from fedlora.actor_pool import replace_dead_actors
from fedlora.adapter_families import get_family
from fedlora.adapters import adapter_state
from fedlora.checkpoint import (
    Checkpoint,
    CheckpointError,
    config_differences,
    find_resumable,
    load_checkpoint,
)
from fedlora.comms import CommsLog
from fedlora.config import ConfigError, check_paths
from fedlora.global_adapter import save_global_adapter
from fedlora.models import build_lora_model
from fedlora.protocol import with_overrides
from fedlora.results import new_run_dir, write_json
from fedlora.timing import RoundTimer
from fedlora.training import evaluate
from fedlora.wire import WireFormat, encoded_bytes, from_record, to_record

from .empty_rounds import EmptyRounds, RunGoingNowhere
from .round_outcome import RoundOutcome, RoundStrategy
from .run_record import RunRecord
from .secure_aggregation import SecureAggregationStrategy
from .strategy import ForeignKeysError, LoraStrategy
from .user_level_strategy import UserLevelDpStrategy

if TYPE_CHECKING:
    from fedlora.run_config import RunConfig

log = logging.getLogger("fedlora")

IDENTIFY_TIMEOUT = 120.0  # seconds the nodes get to answer the identity query

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


def main(grid: Grid, context: Context) -> None:
    """Run the federated fine-tuning described by the run-config."""
    _setup_logging()
    try:
        cfg = runtime.resolve_config(context.run_config)
        check_paths(cfg)
        run_federated(grid, cfg)
    except (ConfigError, RunGoingNowhere) as e:
        log.error("%s", e)
        raise SystemExit(f"fedlora: {e}") from None


def build_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp; ``overrides`` are merged over the run-config (for in-process runs)."""
    replace_dead_actors()  # a simulation runs its engine in the ServerApp's process
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        main(grid, with_overrides(context, overrides))

    return server_app


app = build_app()


def write_report(run_dir: Path) -> None:
    """``report.html`` of the run so far; drawing it never stops the run."""
    from fedlora.report import write_report as render  # deferred: matplotlib, for the report only

    try:
        render([run_dir])
    except Exception as e:  # noqa: BLE001  (a plot that fails must not cost the run)
        log.warning("could not write %s: %s", run_dir / "report.html", e)


def open_checkpoint(cfg: RunConfig) -> tuple[Path, Checkpoint]:
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


def build_strategy(cfg: RunConfig, method, state: dict, comms_log: CommsLog) -> RoundStrategy:
    """The run's strategy: :class:`LoraStrategy`, wrapped for user-level DP when the
    run-config asks for it."""
    central = privacy.server_hook(cfg)
    strategy: RoundStrategy = LoraStrategy(
        method=method,
        template=state,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_nodes,
        wire=WireFormat.from_config(cfg),
        seed=cfg.seed,
        comms_log=comms_log,
        foreign_keys=cfg.foreign_keys,
        max_update_norm=cfg.max_update_norm,
        max_num_examples=cfg.max_num_examples,
        reply_bound=privacy.reply_norm_bound(cfg),
        reply_weights=privacy.reply_weights(cfg),
        dp_on=cfg.dp_mode != "off",
        central_release=central is not None,
    )
    if central is not None:
        strategy = UserLevelDpStrategy(strategy, central)
    if cfg.secure_aggregation:
        strategy = SecureAggregationStrategy(strategy, cfg)
    for mechanism in privacy.parse_dp_mode(cfg.dp_mode):
        if isinstance(mechanism, privacy.ServerMechanism):  # on the secure sum: the sites'
            mechanism = mechanism.site_side(cfg) or mechanism
        log.info("dp-mode '%s' protects: %s", mechanism.name, mechanism.neighbouring)
        plan = mechanism.describe(cfg)
        if plan:
            log.info("plan: %s", plan)
    strategy.summary()
    return strategy


@dataclasses.dataclass
class ServerRun:
    """What the loop works with: the parsed run-config, its folder and record, the server's
    model (for centralised evaluation and saving the adapter), method and strategy."""

    cfg: RunConfig
    run_dir: Path
    spec: Any
    method: Any
    model: Any
    strategy: RoundStrategy
    record: RunRecord
    test_set: Any

    def central_eval(self, state: dict):
        """The global adapter on the task's held-out test set (None: the task has none)."""
        if self.test_set is None:
            return None
        self.method.load(self.model, self.method.evaluation_state(state),
                         client_rank=self.cfg.lora_rank)
        return evaluate(self.model, self.test_set, batch_size=self.cfg.eval_batch_size)


def run_federated(grid: Grid, cfg: RunConfig) -> Path:
    """The round loop; returns the run folder."""
    t_start = time.perf_counter()
    torch.set_num_threads(runtime.choose_num_threads(cfg.client_num_threads))
    run_dir, ckpt = _run_folder(cfg)
    run = _prepare(cfg, run_dir)
    strategy, record = run.strategy, run.record
    arrays, first_round, t_start = _begin(run, ckpt, t_start)
    if first_round <= cfg.num_server_rounds:
        # Stable sampling order across runs: nodes by their partition-id, not Flower's ids.
        strategy.identify_nodes(grid, timeout=cfg.round_timeout or IDENTIFY_TIMEOUT)
    # A resumed run tells clients after which round it resumed: a client whose privacy
    # ledger did not survive the restart charges those rounds (fedlora.privacy.Ledger).
    train_config = ConfigRecord({"resumed-after": ckpt.round if ckpt is not None else 0})
    timeout = cfg.round_timeout or None
    fed_eval = cfg.fraction_evaluate > 0 and cfg.dp_mode == "off" and not cfg.secure_aggregation
    empty = EmptyRounds(cfg.stop_after_empty_rounds, enabled=not record.withhold_replies)
    for rnd in range(first_round, cfg.num_server_rounds + 1):
        timer = RoundTimer()
        try:
            outcome = strategy.train_round(grid, rnd, arrays, train_config, timeout=timeout,
                                           timer=timer)
        except ForeignKeysError:
            record.write_results()  # keep the communication log that shows the offending key
            raise
        if outcome.arrays is not None:
            arrays = outcome.arrays
        state = from_record(arrays)  # the global adapter, decoded once a round
        fed = res = None
        if rnd % cfg.evaluate_every == 0 or rnd == cfg.num_server_rounds:
            if fed_eval:
                fed = strategy.evaluate_round(grid, rnd, arrays, train_config,
                                              timeout=timeout, timer=timer)
            with timer.phase("central_eval"):
                res = run.central_eval(state)
        timer.add_clients(outcome.metrics)
        row = record.add_round(rnd, outcome, res, fed, strategy)
        note = empty.observe(rnd, outcome)
        if note:
            row["note"] = note
        # The checkpoint (with the round's privacy spend) first: a crash after it resumes
        # after this round, so no round is ever released twice on one charge.
        with timer.phase("writing"):
            record.write_checkpoint(rnd, state, run.method, strategy)
            save_global_adapter(run.method, run.spec, run.model, state, run_dir / "adapter")
            record.write_results()
            write_report(run_dir)
        # The round's time, its writing included, is in the next round's files and in the
        # run's last ones: each round's files are written once.
        record.finish_round(row, timer, time.perf_counter() - t_start)
        _log_round(cfg, run.spec.causal_lm, row, outcome, timer)
        if note:
            log.warning(note)
        empty.check(note)  # after the round's files: a stopped run resumes after it
    if first_round <= cfg.num_server_rounds:  # the last round's time, in every file
        record.write_checkpoint(cfg.num_server_rounds, state, run.method, strategy)
    record.write_results()
    write_report(run_dir)
    _log_done(cfg, run.spec.causal_lm, record, time.perf_counter() - t_start)
    return run_dir


def _run_folder(cfg: RunConfig) -> tuple[Path, Checkpoint | None]:
    """The run folder (with config.json written) and, with resume=true, its checkpoint."""
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
    return run_dir, ckpt


def _prepare(cfg: RunConfig, run_dir: Path) -> ServerRun:
    """The server's model, method, strategy, test set and record."""
    spec = runtime.server_spec(cfg)
    method = runtime.method_for(cfg)
    model = build_lora_model(spec)
    state = adapter_state(model)
    _log_sizes(cfg, model, state)
    test_set = runtime.encoded_test_set(cfg)
    if test_set is None:
        log.info("no centralised test set for task '%s': only federated evaluation", cfg.task)
    if cfg.fraction_evaluate > 0 and cfg.dp_mode != "off":
        log.info("federated evaluation is off under dp-mode = '%s': the sites' validation "
                 "loss and accuracy would leave them un-noised (the centralised test set "
                 "is evaluated as usual)", cfg.dp_mode)
    comms_log = CommsLog(full_model_bytes=_model_bytes(model), block_size=cfg.wire_block_size)
    return ServerRun(cfg=cfg, run_dir=run_dir, spec=spec, method=method, model=model,
                     strategy=build_strategy(cfg, method, state, comms_log),
                     record=RunRecord(run_dir, cfg, causal_lm=spec.causal_lm, comms_log=comms_log,
                                      label_names=_label_names(test_set, spec)),
                     test_set=test_set)


def _label_names(test_set, spec) -> tuple[str, ...]:
    """The classifier's label names (for the confusion matrix); () for a causal LM."""
    if test_set is None or spec.causal_lm:
        return ()
    return tuple(test_set.data.label_names)


def _begin(run: ServerRun, ckpt: Checkpoint | None, t_start: float
           ) -> tuple[ArrayRecord, int, float]:
    """The global adapter to start from, the first round to run and the run's start time
    (a resumed run goes on counting): fresh (round 0 evaluated) or from the checkpoint."""
    cfg, record = run.cfg, run.record
    if ckpt is None:
        state = adapter_state(run.model)
        arrays = to_record(state)  # the global adapter: float32 here
        res0 = run.central_eval(state)
        record.add_initial(res0, time.perf_counter() - t_start)
        if res0 is not None:
            log.info("[round 0/%d] initial adapter: test loss %.4f, test accuracy %.4f%s",
                     cfg.num_server_rounds, res0.loss, res0.accuracy,
                     f", test perplexity {res0.perplexity:.2f}" if run.spec.causal_lm else "")
        return arrays, 1, t_start
    arrays = to_record(ckpt.global_state)
    run.strategy.load_state_dict(RunRecord.strategy_state(ckpt))
    run.method.restore_state(ckpt.method_state, ckpt.extra.get("method", {}))
    record.restore(ckpt)
    res = run.central_eval(ckpt.global_state)
    recorded = record.rows[-1].get("test_accuracy") if record.rows else None
    record.add_resume(ckpt.round, res)
    log.info("resuming %s after round %d of %d (from its checkpoint): the round-%d adapter "
             "has test accuracy %s (recorded then: %s); rounds %d-%d to go", run.run_dir,
             ckpt.round, cfg.num_server_rounds, ckpt.round, _fmt(res and res.accuracy),
             _fmt(recorded), ckpt.round + 1, cfg.num_server_rounds)
    if ckpt.round >= cfg.num_server_rounds:
        log.info("%s already finished all %d rounds; nothing to do", run.run_dir,
                 cfg.num_server_rounds)
    return arrays, ckpt.round + 1, t_start - record.elapsed


def _model_bytes(model) -> int:
    return sum(p.numel() for p in model.parameters()) * 4


def _log_sizes(cfg: RunConfig, model, state: dict) -> None:
    wire = WireFormat.from_config(cfg)
    own = get_family(cfg.adapter).sent_keys(state)
    per_update = sum(encoded_bytes(int(state[k].size), wire.dtype, wire.block_size) for k in own)
    full_bytes = _model_bytes(model)
    log.info("adapter '%s': %d tensors of its own, %d in all; %s bytes of its own per message "
             "(full model: %s bytes, ratio %.5f)", cfg.adapter, len(own), len(state),
             f"{per_update:,}", f"{full_bytes:,}", per_update / full_bytes)


def _log_round(cfg: RunConfig, causal_lm: bool, row: dict, outcome: RoundOutcome,
               timer: RoundTimer) -> None:
    rnd, spent = row["round"], outcome.max_epsilon
    log.info("[round %d/%d] time: %s", rnd, cfg.num_server_rounds, timer.line(row["timing"]))
    if row["clients_accepted"] is None:  # user-level DP: which replies came back is private
        clients, up = f"clients sampled {outcome.sampled} (replies not published)", "-"
    else:
        clients = (f"clients {len(outcome.accepted)}/{outcome.sampled} "
                   f"({len(outcome.refused)} refused, {len(outcome.dropped)} dropped)")
        up = f"{row['bytes_up']:,}"
    log.info(
        "[round %d/%d] train loss %s | test loss %s, accuracy %s%s | fed-eval accuracy %s | "
        "%s%s | up %s B, down %s B | %.1f s",
        rnd, cfg.num_server_rounds, _fmt(row["train_loss"]), _fmt(row["test_loss"]),
        _fmt(row["test_accuracy"]),
        f", perplexity {_fmt(row['test_perplexity'], '.2f')}" if causal_lm else "",
        _fmt(row["fed_eval_accuracy"]), clients,
        "" if spent is None else f" | max epsilon {spent:.3f} (target {cfg.target_epsilon})",
        up, f"{row['bytes_down']:,}", row["round_seconds"],
    )


def _log_done(cfg: RunConfig, causal_lm: bool, record: RunRecord, seconds: float) -> None:
    first, final = record.rows[0], record.rows[-1]
    total = record.comms_log.summary()["total_bytes"]
    log.info("done in %.1f s: test accuracy %s -> %s%s over %d rounds; %s bytes up, %s bytes "
             "down; results in %s (adapter: %s, report: report.html)",
             seconds, _fmt(first.get("test_accuracy")), _fmt(final.get("test_accuracy")),
             f" (perplexity {_fmt(first.get('test_perplexity'), '.2f')} -> "
             f"{_fmt(final.get('test_perplexity'), '.2f')})" if causal_lm else "",
             cfg.num_server_rounds, f"{total['up']:,}", f"{total['down']:,}", record.run_dir,
             record.run_dir / "adapter")
