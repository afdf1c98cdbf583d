"""Typed, frozen configuration of the models and of training.

Defaults are the released QIN hyperparameters (salmon1802/QIN). A flagfile
overrides them; explicit flags override the flagfile (see ``qin_tf.train``).
"""

from __future__ import annotations

import dataclasses


#: Values of ``ModelConfig.dtype_policy`` (``None``: Keras' global policy; ``"auto"``: chosen by the
#: hardware, :func:`qin_tf.runtime.resolve_dtype_policy`).
DTYPE_POLICIES = (None, "float32", "mixed_bfloat16", "mixed_float16", "auto")

#: Interest extractors: what turns the target and the history into an interest vector.
EXTRACTORS = ("asta", "din_attention", "transformer")
#: Interaction heads: what turns [context | target | interest] into the logit.
HEADS = ("qnn", "dnn", "dcn_v2", "qnn_dnn")
#: Values of ``ModelConfig.asta_form`` (see ``AdaptiveSparseTargetAttention``).
ASTA_FORMS = ("reassociated", "projected", "folded")
#: ``ModelConfig.model`` presets: the (extractor, head) pair each names.
PRESETS = {"qin": ("asta", "qnn"), "din": ("din_attention", "dnn"), "transformer_dcn": ("transformer", "dcn_v2")}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of QIN and of the DIN baseline.

    Each entry below is also the help text of its flag (see ``qin_tf.train``).

    Attributes:
        model: The model preset to build: qin (the Quadratic Interest
            Network), din (the challenge's DIN baseline) or transformer_dcn (the
            challenge winner's Transformer and DCNv2); --extractor and --head
            override its parts.
        embedding_dim: The embedding size E; an item's vector is 3E wide (its
            id, tags and multimodal parts).
        num_layers: The number of quadratic layers in QIN's QNN head.
        num_row: The number of rows R of each quadratic layer of the QNN (the
            rank of its factorised interaction).
        dropout: The dropout rate in each quadratic layer of the QNN, and in
            the DNN of the DIN baseline.
        batch_norm: Whether the QNN's layers, and the DNN of the DIN baseline,
            use batch normalisation.
        attention_dim: The width of ASTA's query, key and value projections;
            none means 2 * 3E, the original's.
        din_attention_units: The hidden layer sizes of the DIN baseline's
            attention MLP.
        din_dnn_units: The hidden layer sizes of the DIN baseline's DNN.
        embedding_l2: The L2 weight (weight / 2 * ||theta||^2) on the
            embedding tables and the multimodal projection.
        din_attention_dropout: The dropout rate in the DIN baseline's attention
            MLP (the challenge baseline's is 0.1).
        net_l2: The L2 weight (weight / 2 * ||W||^2) on the network's kernels:
            QNN's quadratic layers and ASTA's matrices (QIN), the attention and
            DNN MLPs (DIN); FuxiCTR's net_regularizer, 0 in the released QIN
            config.
        id_dropout: The training-time rate at which whole item-id embeddings
            are dropped, so that an item counts by its tags and multimodal
            vector alone (see ``ItemEmbedding``); 0, the original, turns it off.
        sparse_history: Whether to compute each distinct item's vector once per
            batch and attend over the real (non-padding) history items only
            (exact and several times faster, but not XLA-compatible); false
            computes every slot densely.
        dtype_policy: The Keras dtype policy of the model's layers; none means
            Keras' global policy (float32 unless set), and mixed_bfloat16
            computes in bfloat16 with float32 weights and logit (faster on CPUs
            with AVX512-BF16 or AMX and on TPUs and GPUs, at some cost in
            accuracy; see BENCHMARKS.md); mixed_float16 computes in float16
            (GPUs) and trains with a dynamic loss scale; auto is mixed_bfloat16
            where the hardware computes bfloat16 natively (CPU flag amx_bf16 or
            avx512_bf16, GPUs of compute capability 8.0 or more) and float32
            elsewhere, resolved when the run starts and recorded in its
            config.json (a resumed run keeps the policy it started with).
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
    # Models from parts (qin_tf.model): the preset `model` names an extractor and a head;
    # these fields override either and size the parts that are not QIN's or DIN's.
    extractor: str | None = dataclasses.field(default=None, metadata={"help": (
        "The interest extractor (asta, din_attention or transformer), where none takes the one the "
        "--model preset names.")})
    head: str | None = dataclasses.field(default=None, metadata={"help": (
        "The interaction head (qnn, dnn, dcn_v2 or qnn_dnn: QNN's logit plus a DNN tower's), where none takes "
        "the one the --model preset names.")})
    transformer_layers: int = dataclasses.field(default=2, metadata={"help": (
        "The transformer extractor stacks this many post-norm encoder layers.")})
    transformer_heads: int = dataclasses.field(default=1, metadata={"help": (
        "Each encoder layer of the transformer extractor has this many attention heads, which must "
        "divide the width 6E of a [history item | target] pair.")})
    transformer_ff_units: int = dataclasses.field(default=256, metadata={"help": (
        "Each encoder layer of the transformer extractor has a ReLU feed-forward block this wide.")})
    transformer_dropout: float = dataclasses.field(default=0.2, metadata={"help": (
        "The transformer extractor drops out attention weights and both residual branches at this rate.")})
    transformer_last_k: int = dataclasses.field(default=16, metadata={"help": (
        "The transformer extractor outputs its last this many positions flattened, beside a linear "
        "map of its max-pool over the real positions.")})
    cross_layers: int = dataclasses.field(default=3, metadata={"help": (
        "The dcn_v2 head stacks this many DCNv2 cross layers beside its DNN tower of din_dnn_units.")})
    cross_projection_dim: int | None = dataclasses.field(default=None, metadata={"help": (
        "A deviation from the release when set: each cross layer of the dcn_v2 head uses a low-rank kernel "
        "U V of this rank P ([D, P] then [P, D], keras-rs FeatureCross's projection_dim), where none keeps the "
        "full-rank [D, D] kernel of DCNv2 and the challenge winner's release.")})
    head_mlp_units: tuple[int, ...] = dataclasses.field(default=(64, 32), metadata={"help": (
        "The dcn_v2 head maps its concatenated cross and DNN outputs to the logit through an MLP of "
        "these widths.")})
    head_input_batch_norm: bool = dataclasses.field(default=False, metadata={"help": (
        "A batch norm normalises the head's input [context | target | interest] when this is set.")})
    asta_form: str = dataclasses.field(default="reassociated", metadata={"help": (
        "ASTA computes re-associated (reassociated, the production form), projects every history item "
        "first as the original does (projected, same outputs, for benchmarks), or holds its inference "
        "form W_q W_k^T and W_v W_o (folded, as the exporter serves it).")})
    deduplicate_items: bool | None = dataclasses.field(default=None, metadata={"help": (
        "The item embedding computes each distinct item of a batch once when true and every slot when "
        "false, where none follows sparse_history (false needs --nosparse_history).")})
    use_mm_vector: bool = dataclasses.field(default=True, metadata={"help": (
        "Ablation: false gives every item a zero multimodal part (QIN without the frozen multimodal vector).")})

    def __post_init__(self):
        if self.model not in PRESETS:
            raise ValueError(f"`model` must be one of {tuple(PRESETS)}. Received: model={self.model!r}")
        if self.extractor is not None and self.extractor not in EXTRACTORS:
            raise ValueError(f"`extractor` must be one of {EXTRACTORS} or None. Received: extractor={self.extractor!r}")
        if self.head is not None and self.head not in HEADS:
            raise ValueError(f"`head` must be one of {HEADS} or None. Received: head={self.head!r}")
        for name in ("transformer_layers", "transformer_heads", "transformer_ff_units", "transformer_last_k",
                     "cross_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1. Received: {name}={getattr(self, name)}")
        if not 0.0 <= self.transformer_dropout < 1.0:
            raise ValueError("`transformer_dropout` must be in [0, 1). "
                             f"Received: transformer_dropout={self.transformer_dropout}")
        if self.cross_projection_dim is not None and self.cross_projection_dim < 1:
            raise ValueError("`cross_projection_dim` must be >= 1 or None. "
                             f"Received: cross_projection_dim={self.cross_projection_dim}")
        if not self.head_mlp_units or min(self.head_mlp_units) < 1:
            raise ValueError(f"`head_mlp_units` must be a non-empty list of integers >= 1. "
                             f"Received: head_mlp_units={self.head_mlp_units}")
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
        if self.asta_form not in ASTA_FORMS:
            raise ValueError(f"`asta_form` must be one of {ASTA_FORMS}. Received: asta_form={self.asta_form!r}")
        if self.sparse_history and self.deduplicate_items is False:
            raise ValueError("the sparse history path always deduplicates; `deduplicate_items=False` needs "
                             "sparse_history=False.")
        dim = 6 * self.embedding_dim
        if self.resolved_extractor == "transformer" and dim % self.transformer_heads:
            raise ValueError(f"`transformer_heads` must divide 6 * embedding_dim = {dim}. "
                             f"Received: transformer_heads={self.transformer_heads}")

    @property
    def resolved_extractor(self) -> str:
        """The interest extractor: ``extractor``, or the one the ``model`` preset names."""
        return self.extractor or PRESETS[self.model][0]

    @property
    def resolved_head(self) -> str:
        """The interaction head: ``head``, or the one the ``model`` preset names."""
        return self.head or PRESETS[self.model][1]

    @property
    def name(self) -> str:
        """The name of the preset whose parts these are, else ``"<extractor>__<head>"``."""
        parts = (self.resolved_extractor, self.resolved_head)
        return next((name for name, pair in PRESETS.items() if pair == parts), "__".join(parts))


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
    epochs: int = dataclasses.field(default=100, metadata=_help(
        "Maximum number of epochs; may change when a run resumes (a cap at or below the epochs done "
        "ends the run at once, with the best of them)."))
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
        "Distribution strategy: auto, one_device, mirrored or multi_worker; auto picks multi_worker "
        "if TF_CONFIG names more than one task, mirrored if there is more than one GPU, else one_device."))
    train_split: str = dataclasses.field(default="train", metadata=_help("Split to train on."))
    valid_split: str = dataclasses.field(default="valid", metadata=_help(
        "Labelled split for model selection (learning rate decay, early stopping, best epoch)."))
    monitor_splits: tuple[str, ...] = dataclasses.field(default=(), metadata=_help(
        "More labelled splits to evaluate after every epoch (e.g. test), reported in the "
        "progress lines and metrics.json history only, never used for model selection."))
    log_every_steps: int = dataclasses.field(default=100, metadata=_help(
        "In a log (output not a terminal), print a progress line every this many steps; 0 = by "
        "time only (log_every_seconds)."))
    log_every_seconds: float = dataclasses.field(default=30.0, metadata=_help(
        "In a log (output not a terminal), also print a progress line when this many seconds "
        "have passed since the last one; 0 = by steps only. On a terminal, a progress bar shows "
        "every step instead."))
    export_base: str | None = dataclasses.field(default=None, metadata=_help(
        "If set, the chief exports the best model as a SavedModel under this base "
        "directory at the end (export.exporter)."))
    overwrite: bool = dataclasses.field(default=False, metadata=_help(
        "Allow starting over in a model_dir that holds a finished run."))
    warm_start_from: str | None = dataclasses.field(default=None, metadata=_help(
        "Start a fresh run from the weights of the run in this model_dir (its best.keras), or of the run an "
        "export here (a version directory, or a TF Serving base: its newest version) was exported from, loaded "
        "by name; embedding tables grow to the new spec (rows matched by raw id), the optimizer starts fresh. "
        "A resumed run ignores it (see qin_tf.warm_start)."))

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
        if self.log_every_seconds < 0:
            raise ValueError(f"`log_every_seconds` must be >= 0. Received: log_every_seconds={self.log_every_seconds}")
        if self.train_split == self.valid_split:
            raise ValueError(f"`train_split` and `valid_split` must differ. Received: both {self.train_split!r}")

    @property
    def resolved_eval_batch_size(self) -> int:
        return self.eval_batch_size or self.global_batch_size


#: TrainConfig fields that may change between a run and its resumption.
#: ``epochs`` is one of them: a run resumed with another cap continues (or, when it has done as
#: many epochs already, ends at once) exactly as a run started with that cap would have.
#: ``warm_start_from`` is another: a resumed run continues from its backup and ignores it.
RESUMABLE_CHANGES = ("export_base", "overwrite", "log_every_steps", "log_every_seconds", "data_dir", "model_dir",
                     "epochs", "warm_start_from")


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
