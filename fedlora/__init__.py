"""fedlora: federated, differentially private LoRA fine-tuning of transformers with Flower.

The library: configuration, tasks and data, models with LoRA adapters, training,
aggregation of adapter factors, the wire format and result files. The Flower
ServerApp and ClientApp (``fedlora.app``) are thin glue over it.
"""

__version__ = "0.1.0"
