"""Typed, frozen configuration of the models (and, later, of training).

Defaults are the released QIN hyperparameters (salmon1802/QIN). A flagfile
overrides them; explicit flags override the flagfile (see ``qin_tf.train``).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of QIN and of the DIN baseline.

    Attributes:
        model: ``"qin"`` or ``"din"``.
        embedding_dim: E; an item vector is 3E (id | tags | multimodal).
        num_layers, num_row, dropout, batch_norm: QNN.
        attention_dim: ASTA's q/k/v width; ``None`` means 2 * 3E, the original's.
        din_attention_units, din_dnn_units: the DIN baseline's MLPs.
        embedding_l2: L2 weight (``weight / 2 * ||theta||^2``) on the embedding
            tables and the multimodal projection.
    """

    model: str = "qin"
    embedding_dim: int = 128
    num_layers: int = 4
    num_row: int = 4
    dropout: float = 0.1
    batch_norm: bool = True
    attention_dim: int | None = None
    din_attention_units: tuple[int, ...] = (512, 256)
    din_dnn_units: tuple[int, ...] = (1024, 512, 256)
    embedding_l2: float = 2e-4

    def __post_init__(self):
        if self.model not in ("qin", "din"):
            raise ValueError(f"`model` must be 'qin' or 'din'. Received: model={self.model!r}")
        for name in ("embedding_dim", "num_layers", "num_row"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1. Received: {name}={getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={self.dropout}")
        if self.attention_dim is not None and self.attention_dim < 1:
            raise ValueError(f"`attention_dim` must be >= 1 or None. Received: attention_dim={self.attention_dim}")
        if self.embedding_l2 < 0:
            raise ValueError(f"`embedding_l2` must be >= 0. Received: embedding_l2={self.embedding_l2}")
