"""Whether a private site refuses must not answer a question about its data.

A server that writes the run-config picks the labels, the columns, the maximum length and
the model a site reads its rows with. Under DP none of that may turn into a refusal that
depends on the rows (an un-noised yes/no about them): rows that do not fit are left out, a
site with none left still releases its noised steps, no row is cut longer than the model
reads, and a head with dropout keeps DP-SGD's sensitivity at C in probe rounds too.
"""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import write_reviews
from .test_dp_attacks import _diff, _released, _run_site, _train_message


def _node(tmp_path, data) -> dict:
    return {"data-path": str(data), "accept-dp-modes": "sample,update",
            "privacy-state-path": str(tmp_path / "ledger" / "privacy.json")}


PHASES = {"lora": {"dp-mode": "sample", "dp-recipe": "none"},
          "probe": {"dp-mode": "sample", "probe-rounds": 1, "dp-recipe": "none"},
          "update": {"dp-mode": "update"}}


@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.parametrize("labels", ["negative,positive", "benign,malignant"],
                         ids=["labels-that-fit", "labels-no-row-has"])
def test_the_run_config_labels_cannot_make_a_private_site_refuse(identity, site, tmp_path,
                                                                 phase, labels):
    """Labels that no row has (or a row with an empty text) would have made the site refuse,
    answering "does any row have another label?" for free; under DP such rows are left out,
    and a site left with none still replies with its noised steps."""
    data = write_reviews(tmp_path / "site.csv", 40, seed=4)
    with data.open("a") as f:
        f.write('"",positive,s0\n')  # an empty text
        f.write("a row with a diagnosis,malignant,s1\n")
    run_config = dict(site, **PHASES[phase], labels=labels, **{"data-path": str(data)})
    msg = _train_message(run_config)
    received = {k: v for k, v in _released_from(msg).items()}
    released = _released(_run_site(run_config, _node(tmp_path, data), msg))
    step = _diff(released, received)
    assert np.isfinite(step).all() and np.abs(step).max() > 0  # noised, whatever is left


def test_a_row_longer_than_the_model_reads_cannot_make_a_private_site_refuse(
        identity, site, tmp_path):
    """max-length far above the model's positions (the tiny model reads 128 tokens): a long
    row is cut at 128, so it cannot crash the site and tell the server it is there."""
    data = write_reviews(tmp_path / "site.csv", 30, seed=6)
    with data.open("a") as f:
        f.write(" ".join(["wonderful"] * 400) + ",positive,s0\n")
    for phase in ("probe", "lora"):
        run_config = dict(site, **PHASES[phase], **{"max-length": 4096, "batch-size": 4096,
                                                    "data-path": str(data)})
        node = _node(tmp_path / phase, data)  # a ledger each
        _released(_run_site(run_config, node, _train_message(run_config)))


def _released_from(msg) -> dict[str, np.ndarray]:
    from fedlora.protocol import LORA_KEY
    from fedlora.wire import from_record

    return from_record(msg.content[LORA_KEY])


@pytest.fixture(scope="module")
def tiny_roberta_dir(tmp_path_factory, tiny_model_dir):
    """A 2-layer random RoBERTa classifier: its head (dense, dropout, out_proj) reads every
    token's state, and has dropout of its own."""
    from transformers import (
        AutoTokenizer,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    path = tmp_path_factory.mktemp("tiny-roberta")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = RobertaConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64,
                           max_position_embeddings=130, num_labels=2,
                           pad_token_id=tok.pad_token_id, hidden_dropout_prob=0.3,
                           classifier_dropout=0.3)
    RobertaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_a_probe_step_with_a_dropout_head_moves_by_at_most_c(tiny_roberta_dir, tmp_path):
    """The probe's full-batch DP-SGD step with no noise and learning rate 1 is minus the
    clipped sum; with a head that has dropout (and reads rows of several padded widths),
    one added example may move it by at most C."""
    from fedlora.adapters import adapter_state
    from fedlora.data import EncodedDataset, read_table
    from fedlora.heads import head_module
    from fedlora.models import LoraSpec, build_lora_model, load_tokenizer
    from fedlora.probe import train_head

    path = write_reviews(tmp_path / "r.csv", 12, seed=8)
    data = read_table(path, text_column="text", label_column="label",
                      label_names=("negative", "positive"))
    enc = EncodedDataset(data, load_tokenizer(str(tiny_roberta_dir)), 32)
    c = 0.01

    def clipped_sum(n: int) -> np.ndarray:
        model = build_lora_model(LoraSpec(str(tiny_roberta_dir), 2, 4, 8.0, 0.1,
                                          ("query", "value"), True, pooling="model"))
        head = {id(p) for p in head_module(model).parameters()}
        before = adapter_state(model)
        train_head(model, enc, np.arange(n), steps=1, learning_rate=1.0, noise_multiplier=0.0,
                   max_grad_norm=c, batch_size=4, denominator=1)
        after = adapter_state(model)
        assert head  # the step moved the head only
        return -_diff(after, before)

    without, with_one = clipped_sum(11), clipped_sum(12)
    assert np.linalg.norm(without) > c  # a real sum of clipped gradients
    moved = np.linalg.norm(with_one - without)
    assert moved <= c * (1 + 1e-3), f"one example moved the probe's step by {moved / c:.3f} C"


def test_a_site_that_dies_while_training_has_already_paid_for_the_round(identity, site,
                                                                        tmp_path, monkeypatch):
    """Whether training fails, or the process dies (killed for memory), may depend on the
    data: the ledger file holds the round's charge before training starts, so a death that
    a crafted run could provoke round after round is never free."""
    import fedlora.app.client.client_app as client_app
    from fedlora.privacy import load_state

    data = write_reviews(tmp_path / "site.csv", 40, seed=4)
    run_config = dict(site, **PHASES["lora"], **{"data-path": str(data)})
    node = _node(tmp_path, data)

    class ProcessDied(BaseException):  # not an Exception: nothing in the site catches it
        pass

    def die(*args, **kwargs):
        raise ProcessDied

    monkeypatch.setattr(client_app, "_train_and_release", die)
    with pytest.raises(ProcessDied):
        _run_site(run_config, node, _train_message(run_config))
    ledger = load_state(tmp_path / "ledger" / "privacy.json")
    assert ledger.total_steps == run_config.get("local-steps", 10)  # the round, charged
    assert ledger.epsilon(1e-5) > 0
