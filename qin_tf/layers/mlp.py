"""A plain MLP block (FuxiCTR's ``MLP_Block``) for the DIN baseline."""

from __future__ import annotations

import keras

from qin_tf.layers.dropout import Dropout


@keras.saving.register_keras_serializable(package="qin_tf")
class MLPBlock(keras.layers.Layer):
    """Dense layers, each followed by optional batch norm, an activation and dropout.

    For each width ``u`` in ``hidden_units``::

        x <- Dropout(act(BN(x W + b)))          (BN only with batch_norm=True)

    then, if ``output_units`` is set, a last ``x W + b`` without activation.
    The order Linear -> BatchNorm -> activation -> Dropout is FuxiCTR's.

    Args:
        hidden_units: widths of the hidden layers (may be empty).
        activation: hidden activation.
        dropout: dropout rate after each hidden layer.
        batch_norm: batch norm after each hidden Dense (momentum 0.9 and
            epsilon 1e-5, i.e. PyTorch's BatchNorm1d defaults).
        output_units: width of a final linear layer, or ``None``.
        output_dtype: dtype policy of the final layer; ``None`` means the
            block's. ``"float32"`` keeps a logit in full precision under mixed
            precision.
        kernel_initializer: Glorot normal, as FuxiCTR.
        kernel_regularizer: optional, on every Dense kernel (hidden and output).

    Input ``[..., D]`` -> output ``[..., output_units or hidden_units[-1]]``.

    Example:

    >>> MLPBlock([8, 4], output_units=1)(np.ones((2, 3))).shape
    TensorShape([2, 1])

    Reference: FuxiCTR 2.3.7 ``MLP_Block``.
    """

    def __init__(self, hidden_units, activation="relu", dropout=0.0, batch_norm=False, output_units=None,
                 output_dtype=None, kernel_initializer="glorot_normal", kernel_regularizer=None, **kwargs):
        super().__init__(**kwargs)
        hidden_units = [int(u) for u in hidden_units]
        if hidden_units and min(hidden_units) < 1:
            raise ValueError(f"every hidden width must be >= 1. Received: hidden_units={hidden_units}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
        if output_units is not None and output_units < 1:
            raise ValueError(f"`output_units` must be >= 1 or None. Received: output_units={output_units}")
        if not hidden_units and output_units is None:
            raise ValueError("an MLPBlock needs `hidden_units` or `output_units`.")
        self.hidden_units = hidden_units
        self.activation = keras.activations.get(activation)
        self.dropout = float(dropout)
        self.batch_norm = bool(batch_norm)
        self.output_units = output_units
        self.output_dtype = output_dtype
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        policy = self.dtype_policy
        self.dense_layers = [keras.layers.Dense(u, kernel_initializer=self.kernel_initializer,
                                                kernel_regularizer=self.kernel_regularizer, dtype=policy,
                                                name=f"dense_{i}") for i, u in enumerate(hidden_units)]
        self.norm_layers = [keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, dtype=policy,
                                                            # batch statistics over all replicas:
                                                            # MirroredStrategy == one device
                                                            synchronized=True, name=f"batch_norm_{i}")
                            for i in range(len(hidden_units))] if self.batch_norm else []
        self.dropout_layers = [Dropout(self.dropout, dtype=policy, name=f"dropout_{i}")
                               for i in range(len(hidden_units))] if self.dropout > 0 else []
        self.output_layer = None
        if output_units is not None:
            self.output_layer = keras.layers.Dense(output_units, kernel_initializer=self.kernel_initializer,
                                                   kernel_regularizer=self.kernel_regularizer,
                                                   dtype=output_dtype or policy, name="output")

    def build(self, input_shape):
        shape = tuple(input_shape)
        for i, dense in enumerate(self.dense_layers):
            dense.build(shape)
            shape = shape[:-1] + (dense.units,)
            if self.norm_layers:
                self.norm_layers[i].build(shape)
            if self.dropout_layers:
                self.dropout_layers[i].build(shape)
        if self.output_layer is not None:
            self.output_layer.build(shape)
        self.built = True

    def call(self, inputs, training=None):
        x = inputs
        for i, dense in enumerate(self.dense_layers):
            x = dense(x)
            if self.norm_layers:
                x = self.norm_layers[i](x, training=training)
            x = self.activation(x)
            if self.dropout_layers:
                x = self.dropout_layers[i](x, training=training)
        if self.output_layer is not None:
            x = self.output_layer(x)
        return x

    def compute_output_shape(self, input_shape):
        width = self.output_units if self.output_units is not None else self.hidden_units[-1]
        return tuple(input_shape)[:-1] + (width,)

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_units=list(self.hidden_units),
            activation=keras.activations.serialize(self.activation),
            dropout=self.dropout,
            batch_norm=self.batch_norm,
            output_units=self.output_units,
            output_dtype=self.output_dtype,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            kernel_regularizer=keras.regularizers.serialize(self.kernel_regularizer),
        )
        return config
