"""A sequence classifier that reads the mean of its encoder's token states, as plain
transformers code.

transformers has no class that puts a linear classifier directly on the masked mean of a
BERT-like encoder's token states, the head that ``head-pooling = mean`` trains
(:class:`fedlora.heads.PooledClassifier`). ``fedlora export`` writes this file next to the
weights of such a model and names it in the config's ``auto_map``, so that

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)

loads it offline from the folder itself, without fedlora. This module imports only torch
and transformers, so that it runs wherever it is copied. Its config has a model type of its
own: without ``trust_remote_code`` transformers refuses to load the folder instead of
loading a [CLS]-pooled model that would predict something else.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

MODEL_TYPE = "fedlora-mean-pooled"


class MeanPooledConfig(PretrainedConfig):
    """The encoder's own config (``encoder``, a dict with its ``model_type``) plus the
    classification labels (``id2label``/``label2id``, from the base class)."""

    model_type = MODEL_TYPE

    def __init__(self, encoder: dict[str, Any] | None = None, classifier_dropout: float = 0.1,
                 **kwargs: Any) -> None:
        self.encoder = dict(encoder or {})
        self.classifier_dropout = float(classifier_dropout)
        super().__init__(**kwargs)

    def encoder_config(self) -> PretrainedConfig:
        """The encoder's config object (e.g. a ``BertConfig``)."""
        values = dict(self.encoder)
        model_type = values.pop("model_type", None)
        if not model_type:
            raise ValueError("MeanPooledConfig.encoder has no 'model_type'")
        return AutoConfig.for_model(model_type, **values)

    @property
    def hidden_size(self) -> int:
        return int(self.encoder["hidden_size"])


class MeanPooledForSequenceClassification(PreTrainedModel):
    """``classifier(mean over unmasked tokens(encoder(x)))``, cross-entropy on labels."""

    config_class = MeanPooledConfig
    base_model_prefix = "encoder"

    def __init__(self, config: MeanPooledConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.encoder = AutoModel.from_config(config.encoder_config())
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear) and module is self.classifier:
            module.weight.data.normal_(std=0.02)
            module.bias.data.zero_()

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**inputs).last_hidden_state  # (batch, width, hidden)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, width, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (batch, hidden)
        pooled = self.dropout(pooled.float())
        logits = self.classifier(pooled.to(self.classifier.weight.dtype))  # (batch, labels)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)
