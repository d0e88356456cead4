"""What a run writes in its folder: the per-round rows, the result files and the checkpoint.

:class:`RunRecord` holds the metrics rows (``metrics.csv``/``metrics.json``), the privacy
rows (``privacy.csv``), the communication log (``comms.csv``/``comms.json``) and the
resumes of a run, turns each round's :class:`~fedlora.app.server.round_outcome.RoundOutcome` into its
row, and writes the files and ``checkpoint.npz`` (:mod:`fedlora.checkpoint`). For a
classifier each centralised evaluation's confusion matrix goes into its row
(``test_confusion``), and the latest one, with per-class precision, recall and F1, into
``evaluation.json`` (the file ``fedlora evaluate RUN_DIR`` writes; the report shows it).
``metrics.json`` is written last: once it shows a round, every other file has that round.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.checkpoint import Checkpoint, save_checkpoint
from fedlora.comms import COLUMNS as COMMS_COLUMNS
from fedlora.comms import CommsLog
from fedlora.metrics import confusion_metrics
from fedlora.privacy import PRIVACY_COLUMNS, privacy_row, server_mechanism
from fedlora.results import write_csv, write_json
from fedlora.timing import RoundTimer

from .round_outcome import RoundOutcome, RoundStrategy

if TYPE_CHECKING:
    from fedlora.run_config import RunConfig

__all__ = ["METRIC_COLUMNS", "PERPLEXITY_COLUMNS", "RunRecord"]

METRIC_COLUMNS = (
    "round", "train_loss", "test_loss", "test_accuracy", "fed_eval_loss", "fed_eval_accuracy",
    "clients_sampled", "clients_accepted", "clients_refused", "clients_dropped", "max_epsilon",
    "max_update_norm", "bytes_up", "bytes_down", "round_seconds", "elapsed_seconds",
)
# Only for causal-LM tasks (e.g. shakespeare), where test_accuracy is next-token accuracy.
PERPLEXITY_COLUMNS = ("test_perplexity", "fed_eval_perplexity")


def perplexity(loss: float | None) -> float | None:
    """exp of a mean token loss (the federated one is example-weighted over clients)."""
    return None if loss is None or not math.isfinite(loss) else math.exp(min(loss, 700.0))


class RunRecord:
    """The rows and files of one run in ``run_dir`` (see the module docstring)."""

    def __init__(self, run_dir: Path, cfg: RunConfig, *, causal_lm: bool,
                 comms_log: CommsLog, label_names: tuple[str, ...] = ()) -> None:
        self.run_dir, self.cfg, self.causal_lm, self.comms_log = run_dir, cfg, causal_lm, comms_log
        #: user-level DP (``client``): which replies came back is not published
        self.withhold_replies = server_mechanism(cfg.dp_mode) is not None
        self.label_names = label_names  # the classifier's, for its confusion matrix
        self.columns = METRIC_COLUMNS + (PERPLEXITY_COLUMNS if causal_lm else ())
        self.rows: list[dict] = []
        self.privacy_rows: list[dict] = []
        self.resumes: list[dict] = []
        self.evaluation: dict | None = None  # the latest centralised evaluation's metrics

    # -- rows ---------------------------------------------------------------------------
    def add_initial(self, res: Any, elapsed: float) -> None:
        """Round 0: the initial adapter's centralised evaluation (None: no test set)."""
        row = {"round": 0, "test_loss": res and res.loss, "test_accuracy": res and res.accuracy,
               "elapsed_seconds": elapsed}
        if self.causal_lm:
            row["test_perplexity"] = res and res.perplexity
        self._note_evaluation(0, res, row)
        self.rows.append(row)

    def restore(self, ckpt: Checkpoint) -> None:
        """The rows, communication log and resumes of the checkpoint a resumed run continues."""
        self.rows, self.privacy_rows = list(ckpt.rows), list(ckpt.privacy_rows)
        self.comms_log.restore(ckpt.comms_rows)
        self.resumes = list(ckpt.extra.get("resumes", []))

    def add_resume(self, after_round: int, res: Any) -> None:
        self._note_evaluation(after_round, res)
        self.resumes.append({"after_round": after_round,
                             "at": time.strftime("%Y-%m-%d %H:%M:%S"),
                             "test_accuracy": res.accuracy if res else None,
                             "test_loss": res.loss if res else None})

    @property
    def elapsed(self) -> float:
        """The run's seconds recorded so far (a resumed run goes on counting)."""
        return float(self.rows[-1].get("elapsed_seconds") or 0.0) if self.rows else 0.0

    def add_round(self, server_round: int, outcome: RoundOutcome, res: Any,
                  fed: Any, strategy: RoundStrategy) -> dict:
        """The round's row (its time is set by :meth:`finish_round`) and privacy rows."""
        for node, values in outcome.privacy:
            self.privacy_rows.append(privacy_row(server_round, node, values, self.cfg.dp_mode))
        totals = self.comms_log.round_totals(server_round)
        # Under user-level DP the replies' fates depend on the clients' data: withheld.
        hide = self.withhold_replies
        train = outcome.train_metrics
        row = {
            "round": server_round,
            "train_loss": train.get("train-loss") if train else None,
            "test_loss": res.loss if res else None,
            "test_accuracy": res.accuracy if res else None,
            "fed_eval_loss": fed.get("eval-loss") if fed else None,
            "fed_eval_accuracy": fed.get("eval-accuracy") if fed else None,
            "clients_sampled": outcome.sampled,
            "clients_accepted": None if hide else len(outcome.accepted),
            "clients_refused": None if hide else len(outcome.refused),
            "clients_dropped": None if hide else len(outcome.dropped),
            "max_epsilon": outcome.max_epsilon,
            "max_update_norm": max(outcome.update_norms) if outcome.update_norms else None,
            "refused": [] if hide else [{"node": strategy.public_node(n), "reason": r}
                                        for n, r in outcome.refused],
            "dropped": [] if hide else [{"node": strategy.public_node(n), "reason": r}
                                        for n, r in outcome.dropped],
            "bytes_up": None if hide else totals["up"],
            "bytes_down": totals["down"],
            "round_seconds": None,  # set once the round's files are written
            "elapsed_seconds": None,
        }
        if self.causal_lm:
            row["test_perplexity"] = res.perplexity if res else None
            row["fed_eval_perplexity"] = perplexity(fed.get("eval-loss")) if fed else None
        self._note_evaluation(server_round, res, row)
        self.rows.append(row)
        return row

    def _note_evaluation(self, server_round: int, res: Any, row: dict | None = None) -> None:
        """A classifier's confusion matrix of the centralised test set: into ``row`` and,
        with its per-class metrics, into :attr:`evaluation` (``evaluation.json``)."""
        confusion = getattr(res, "confusion", None)
        if confusion is None or len(confusion) != len(self.label_names):
            return
        if row is not None:
            row["test_confusion"] = [list(r) for r in confusion]
        self.evaluation = {"model": str(self.run_dir), "data": "the run's test set",
                           "round": server_round,
                           **confusion_metrics(confusion, self.label_names), "loss": res.loss}

    def finish_round(self, row: dict, timer: RoundTimer, elapsed: float) -> None:
        row["timing"] = timer.breakdown()
        row["round_seconds"] = row["timing"]["total"]
        row["elapsed_seconds"] = elapsed

    # -- files --------------------------------------------------------------------------
    def write_results(self) -> None:
        d, cfg = self.run_dir, self.cfg
        write_csv(d / "metrics.csv", self.rows, self.columns)
        write_csv(d / "comms.csv", self.comms_log.rows(), COMMS_COLUMNS)
        write_json(d / "comms.json", self.comms_log.summary())
        if cfg.dp_mode != "off":
            write_csv(d / "privacy.csv", self.privacy_rows, PRIVACY_COLUMNS)
        if self.evaluation is not None:
            write_json(d / "evaluation.json", self.evaluation)
        write_json(d / "metrics.json", {"config": cfg.to_dict(), "rounds": self.rows,
                                        "comms": self.comms_log.summary(),
                                        "resumes": self.resumes})

    def write_checkpoint(self, server_round: int, global_state: dict, method: Any,
                         strategy: RoundStrategy) -> None:
        """``checkpoint.npz`` after ``server_round``: the global adapter, the method's and
        the strategy's state (the server's user-level ledger included) and every row."""
        method_arrays, method_values = method.checkpoint_state()
        state = strategy.state_dict()
        extra = {"method": method_values, "resumes": self.resumes,
                 "counts": state.get("counts") or {}}
        if "central-dp" in state:
            extra["central-dp"] = state["central-dp"]
        save_checkpoint(self.run_dir, Checkpoint(
            round=server_round, config=self.cfg.to_dict(), global_state=global_state,
            method_state=method_arrays, rng_state=state.get("rng"),
            wire_state=state.get("wire", {}), rows=self.rows,
            comms_rows=self.comms_log.rows(), privacy_rows=self.privacy_rows, extra=extra))

    @staticmethod
    def strategy_state(ckpt: Checkpoint) -> dict:
        """What :meth:`write_checkpoint` saved of the strategy, for ``load_state_dict``."""
        state = {"rng": ckpt.rng_state, "wire": ckpt.wire_state,
                 "counts": ckpt.extra.get("counts") or {}}
        if "central-dp" in ckpt.extra:
            state["central-dp"] = ckpt.extra["central-dp"]
        return state
