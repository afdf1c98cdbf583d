"""Typed, frozen configuration of the models and of training.

Defaults are the released QIN hyperparameters (salmon1802/QIN). A flagfile
overrides them; explicit flags override the flagfile (see ``qin_tf.train``).
"""

from __future__ import annotations

import dataclasses


#: Values of ``ModelConfig.dtype_policy`` (``None``: Keras' global policy).
DTYPE_POLICIES = (None, "float32", "mixed_bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of QIN and of the DIN baseline.

    Attributes:
        model: ``"qin"`` or ``"din"``.
        embedding_dim: E; an item vector is 3E (id | tags | multimodal).
        num_layers, num_row, dropout, batch_norm: QNN.
        attention_dim: ASTA's q/k/v width; ``None`` means 2 * 3E, the original's.
        din_attention_units, din_dnn_units: the DIN baseline's MLPs.
        din_attention_dropout: dropout in DIN's attention MLP (challenge
            baseline: 0.1); DIN's DNN uses ``dropout`` and ``batch_norm``.
        embedding_l2: L2 weight (``weight / 2 * ||theta||^2``) on the embedding
            tables and the multimodal projection.
        id_dropout: training-time dropout of whole item-id embeddings (each
            item then counts by its tags and multimodal vector alone), see
            ``ItemEmbedding``; 0 (default, the original) turns it off.
        net_l2: L2 weight (``weight / 2 * ||W||^2``) on the kernels of the
            network: QNN's quadratic layers and ASTA's matrices (QIN), the
            attention and DNN MLPs (DIN). FuxiCTR's ``net_regularizer``; the
            released QIN config has 0.
        sparse_history: compute each distinct item's vector once per batch and
            attend over the real (non-padding) history items only
            (``tf.unique``/``tf.where``: exact, several times faster, no XLA);
            ``False`` computes every slot densely (XLA-compatible).
        dtype_policy: Keras dtype policy of the model's layers; ``None`` means
            Keras' global policy (float32 unless set). ``"mixed_bfloat16"``
            (opt-in) computes in bfloat16 with float32 weights and a float32
            logit: faster on CPUs with AVX512-BF16 or AMX and on TPUs/GPUs,
            at some cost in accuracy (see BENCHMARKS.md).
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
    din_attention_dropout: float = 0.1
    net_l2: float = 0.0
    id_dropout: float = 0.0
    sparse_history: bool = True
    dtype_policy: str | None = None
    use_mm_vector: bool = dataclasses.field(default=True, metadata={"help": (
        "Ablation: false gives every item a zero multimodal part (QIN without the frozen multimodal vector).")})

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
        if not 0.0 <= self.din_attention_dropout < 1.0:
            raise ValueError("`din_attention_dropout` must be in [0, 1). "
                             f"Received: din_attention_dropout={self.din_attention_dropout}")
        if self.embedding_l2 < 0:
            raise ValueError(f"`embedding_l2` must be >= 0. Received: embedding_l2={self.embedding_l2}")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"`id_dropout` must be in [0, 1). Received: id_dropout={self.id_dropout}")
        if self.net_l2 < 0:
            raise ValueError(f"`net_l2` must be >= 0. Received: net_l2={self.net_l2}")
        if self.dtype_policy not in DTYPE_POLICIES:
            raise ValueError(f"`dtype_policy` must be one of {DTYPE_POLICIES}. "
                             f"Received: dtype_policy={self.dtype_policy!r}")


# --------------------------------------------------------------------------
# Training (owner: training). Flags are generated from these fields: the field
# name is the flag name, `metadata["help"]` its help text (see qin_tf.train).
# --------------------------------------------------------------------------

#: Values of ``TrainConfig.strategy``.
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")


def _help(text: str) -> dict:
    return {"help": text}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train: data, output, optimiser, schedule, distribution.

    Defaults are the recipe of the released QIN run on MicroLens_1M
    (salmon1802/QIN, ``checkpoints/MicroLens_1M_x1/QIN_variety_v9_9701.log``,
    FuxiCTR 2.3.7): Adam, learning rate 2e-3, batch 8192, evaluation on valid
    after every epoch; an epoch whose valid AUC does not beat the best by
    ``min_delta`` (1e-6) multiplies the learning rate by ``lr_decay_factor``
    (0.5, floor ``min_lr`` 1e-6); ``patience`` (8) such epochs in a row stop
    the run; the best epoch's weights are restored at the end. Gradients are
    clipped by global norm ``clipnorm`` (10, FuxiCTR's default).

    ``patience`` 8 is the value of that run's resolved parameters (it stopped
    after epoch 41, best at 33); the repository's ``model_config.yaml``
    template ``QIN_variety_v9`` says 3 (with ``num_row`` 3) and its ``Base``
    section 5: the published result used 8.
    """

    data_dir: str = dataclasses.field(default="", metadata=_help(
        "Output of pipelines.preprocess (holds feature_spec.json). Required."))
    model_dir: str = dataclasses.field(default="", metadata=_help(
        "Where checkpoints, logs, best.keras, metrics.json and curves.png go. Required."))
    global_batch_size: int = dataclasses.field(default=8192, metadata=_help(
        "GLOBAL batch size; each replica gets global_batch_size / num_replicas_in_sync."))
    eval_batch_size: int | None = dataclasses.field(default=None, metadata=_help(
        "Batch size for evaluation and prediction; none = global_batch_size."))
    epochs: int = dataclasses.field(default=100, metadata=_help("Maximum number of epochs."))
    steps_per_epoch: int | None = dataclasses.field(default=None, metadata=_help(
        "Training steps per epoch; none = one pass over the train split "
        "(ceil(rows / global_batch_size))."))
    learning_rate: float = dataclasses.field(default=2e-3, metadata=_help("Adam's initial learning rate."))
    clipnorm: float | None = dataclasses.field(default=10.0, metadata=_help(
        "Clip gradients by this global norm; none = no clipping."))
    lr_decay_factor: float = dataclasses.field(default=0.5, metadata=_help(
        "Multiply the learning rate by this after every epoch whose valid AUC does not improve."))
    min_lr: float = dataclasses.field(default=1e-6, metadata=_help("Floor of the learning rate decay."))
    min_delta: float = dataclasses.field(default=1e-6, metadata=_help(
        "An epoch improves if its valid AUC reaches the best so far + min_delta."))
    patience: int = dataclasses.field(default=8, metadata=_help(
        "Stop after this many epochs in a row without improvement of valid AUC."))
    seed: int = dataclasses.field(default=20242025, metadata=_help(
        "Seed of weights, dropout and data shuffling."))
    deterministic: bool = dataclasses.field(default=False, metadata=_help(
        "Make every op deterministic (tf.config.experimental.enable_op_determinism): "
        "bitwise-reproducible runs and resumes, slower on GPU."))
    strategy: str = dataclasses.field(default="auto", metadata=_help(
        "auto | one_device | mirrored | multi_worker. auto: multi_worker if TF_CONFIG names "
        "more than one task, mirrored if more than one GPU, else one_device."))
    train_split: str = dataclasses.field(default="train", metadata=_help("Split to train on."))
    valid_split: str = dataclasses.field(default="valid", metadata=_help(
        "Labelled split for model selection (learning rate decay, early stopping, best epoch)."))
    monitor_splits: tuple[str, ...] = dataclasses.field(default=(), metadata=_help(
        "More labelled splits to evaluate after every epoch (e.g. test), reported in the "
        "progress lines and metrics.json history only, never used for model selection."))
    log_every_steps: int = dataclasses.field(default=100, metadata=_help(
        "Print training progress every this many steps (0 = once per epoch)."))
    export_base: str | None = dataclasses.field(default=None, metadata=_help(
        "If set, the chief exports the best model as a SavedModel under this base "
        "directory at the end (export.exporter)."))
    overwrite: bool = dataclasses.field(default=False, metadata=_help(
        "Allow starting over in a model_dir that holds a finished run."))

    def __post_init__(self):
        def positive(name, allow_none=False):
            v = getattr(self, name)
            if allow_none and v is None:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"`{name}` must be an integer >= 1. Received: {name}={v!r}")

        for name in ("global_batch_size", "epochs", "patience"):
            positive(name)
        for name in ("eval_batch_size", "steps_per_epoch"):
            positive(name, allow_none=True)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"`strategy` must be one of {STRATEGIES}. Received: strategy={self.strategy!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"`learning_rate` must be > 0. Received: learning_rate={self.learning_rate}")
        if self.clipnorm is not None and not self.clipnorm > 0:
            raise ValueError(f"`clipnorm` must be > 0 or None. Received: clipnorm={self.clipnorm}")
        if not 0.0 < self.lr_decay_factor <= 1.0:
            raise ValueError(f"`lr_decay_factor` must be in (0, 1]. Received: lr_decay_factor={self.lr_decay_factor}")
        if self.min_lr < 0 or self.min_delta < 0:
            raise ValueError(f"`min_lr` and `min_delta` must be >= 0. Received: min_lr={self.min_lr}, "
                             f"min_delta={self.min_delta}")
        if self.log_every_steps < 0:
            raise ValueError(f"`log_every_steps` must be >= 0. Received: log_every_steps={self.log_every_steps}")
        if self.train_split == self.valid_split:
            raise ValueError(f"`train_split` and `valid_split` must differ. Received: both {self.train_split!r}")

    @property
    def resolved_eval_batch_size(self) -> int:
        return self.eval_batch_size or self.global_batch_size


#: TrainConfig fields that may change between a run and its resumption.
RESUMABLE_CHANGES = ("export_base", "overwrite", "log_every_steps", "data_dir", "model_dir")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything a training run is: the model and how it is trained.

    Written to ``model_dir/config.json`` as ``{"model": {...}, "train": {...}}``.
    """

    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()

    def to_dict(self) -> dict:
        return {"model": _jsonable(dataclasses.asdict(self.model)),
                "train": _jsonable(dataclasses.asdict(self.train))}

    @classmethod
    def from_dict(cls, d: dict) -> "ExperimentConfig":
        return cls(model=_from_dict(ModelConfig, d.get("model", {})),
                   train=_from_dict(TrainConfig, d.get("train", {})))


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _from_dict(cls, d: dict):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}.")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**kwargs)
