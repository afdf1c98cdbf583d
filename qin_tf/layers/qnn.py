"""QIN's Quadratic Neural Network (QNN): stacked Khatri-Rao quadratic layers."""

from __future__ import annotations

import keras
from keras import ops

from qin_tf.layers.dropout import Dropout


@keras.saving.register_keras_serializable(package="qin_tf")
class QuadraticLayer(keras.layers.Layer):
    """One quadratic interaction: ``h = x (.) sum_r Dropout(W x + b)_r``.

    ``W`` maps D to ``R * D`` (kernel ``[D, R * D]``, bias ``[R * D]``); its output
    is viewed as R rows of D (row ``r`` is columns ``r*D .. r*D + D - 1``),
    dropout acts on that output element-wise, and the rows are summed::

        y = Dropout(x W + b)                      [batch, R * D]
        h_d = x_d * sum_r y[r * D + d]            [batch, D]

    Every output is a weighted sum of products ``x_d x_e``: a rank-R
    (Khatri-Rao) factorised second-order interaction.

    Without dropout (inference, or ``dropout=0``) the sum over rows commutes
    with the linear map, so the layer runs with the folded ``[D, D]`` kernel
    ``sum_r W_r`` and bias ``sum_r b_r`` -- R times fewer operations, same
    result up to float rounding.

    Args:
        num_row: R.
        dropout: rate on ``W x + b`` in training.
        kernel_initializer, bias_initializer: Glorot normal and zeros, as FuxiCTR.
        kernel_regularizer, bias_regularizer: optional.
        seed: optional seed of the dropout.

    Input ``[batch, D]`` -> output ``[batch, D]``.

    Example:

    >>> QuadraticLayer(num_row=2)(np.ones((3, 4))).shape
    TensorShape([3, 4])

    Reference: salmon1802/QIN ``src/QIN_variety_v9.py`` (``QuadraticLayer``);
    Li et al., "QIN: Quadratic Interest Network for Multimodal CTR Prediction", 2025.
    """

    def __init__(self, num_row=2, dropout=0.0, kernel_initializer="glorot_normal", bias_initializer="zeros",
                 kernel_regularizer=None, bias_regularizer=None, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(num_row, int) or num_row < 1:
            raise ValueError(f"`num_row` must be >= 1. Received: num_row={num_row!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
        self.num_row = num_row
        self.dropout = float(dropout)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.seed = seed
        self.dropout_layer = Dropout(self.dropout, seed=seed, dtype=self.dtype_policy,
                                                  name="dropout") if self.dropout > 0 else None

    def build(self, input_shape):
        dim = input_shape[-1]
        if dim is None:
            raise ValueError("the last dimension of the input must be known.")
        self.input_dim = dim
        self.kernel = self.add_weight(name="kernel", shape=(dim, self.num_row * dim),
                                      initializer=self.kernel_initializer, regularizer=self.kernel_regularizer)
        self.bias = self.add_weight(name="bias", shape=(self.num_row * dim,),
                                    initializer=self.bias_initializer, regularizer=self.bias_regularizer)
        if self.dropout_layer is not None:
            self.dropout_layer.build((None, self.num_row * dim))
        self.built = True

    def call(self, inputs, training=None):
        d, r = self.input_dim, self.num_row
        if training and self.dropout_layer is not None:
            y = self.dropout_layer(ops.matmul(inputs, self.kernel) + self.bias, training=True)
            y = ops.sum(ops.reshape(y, (-1, r, d)), axis=1)
        else:
            kernel = ops.sum(ops.reshape(self.kernel, (d, r, d)), axis=1)
            bias = ops.sum(ops.reshape(self.bias, (r, d)), axis=0)
            y = ops.matmul(inputs, kernel) + bias
        return inputs * y

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_row=self.num_row,
            dropout=self.dropout,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
            kernel_regularizer=keras.regularizers.serialize(self.kernel_regularizer),
            bias_regularizer=keras.regularizers.serialize(self.bias_regularizer),
            seed=self.seed,
        )
        return config


@keras.saving.register_keras_serializable(package="qin_tf")
class QuadraticNeuralNetwork(keras.layers.Layer):
    """QIN's QNN: residual quadratic layers, then a linear logit.

    For ``l = 1..num_layers``::

        x <- x + Dropout(PReLU(BN(QuadraticLayer_l(x))))
        logit = x w + b                                             [batch, 1]

    BatchNorm is PyTorch's ``BatchNorm1d`` (epsilon 1e-5, momentum 0.1, i.e.
    Keras momentum 0.9), present when ``batch_norm``; PReLU has one shared
    slope initialised at 0.25; the quadratic layers drop out their linear map
    and the block drops out its output at the same ``dropout`` rate.

    The final Dense(1) computes in the layer's *variable* dtype (float32 under
    ``mixed_bfloat16``), so the logit keeps full precision.

    Args:
        num_layers: number of quadratic layers (released QIN: 4).
        num_row: R of each quadratic layer (see :class:`QuadraticLayer`).
        dropout: rate (released QIN: 0.1).
        batch_norm: batch norm after each quadratic layer (released QIN: on).
        kernel_initializer: Glorot normal, as FuxiCTR.
        kernel_regularizer: optional, on the quadratic kernels and the output kernel.
        seed: optional dropout seed.

    Input ``[batch, D]`` -> logit ``[batch, 1]``.

    Example:

    >>> QuadraticNeuralNetwork(num_layers=2, num_row=2)(np.ones((3, 4))).shape
    TensorShape([3, 1])

    Reference: salmon1802/QIN ``src/QIN_variety_v9.py``
    (``QuadraticNeuralNetworks``); Li et al., 2025.
    """

    def __init__(self, num_layers=3, num_row=2, dropout=0.1, batch_norm=False,
                 kernel_initializer="glorot_normal", kernel_regularizer=None, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"`num_layers` must be >= 1. Received: num_layers={num_layers!r}")
        if not isinstance(num_row, int) or num_row < 1:
            raise ValueError(f"`num_row` must be >= 1. Received: num_row={num_row!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
        self.num_layers = num_layers
        self.num_row = num_row
        self.dropout = float(dropout)
        self.batch_norm = bool(batch_norm)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.seed = seed
        policy = self.dtype_policy

        def sub_seed(i, k):
            return None if seed is None else seed + 2 * i + k

        self.quadratic_layers = [
            QuadraticLayer(num_row=num_row, dropout=self.dropout, kernel_initializer=self.kernel_initializer,
                           kernel_regularizer=self.kernel_regularizer, seed=sub_seed(i, 0), dtype=policy,
                           name=f"quadratic_{i}")
            for i in range(num_layers)]
        self.norm_layers = [keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, dtype=policy,
                                                            # batch statistics over all replicas:
                                                            # MirroredStrategy == one device
                                                            synchronized=True, name=f"batch_norm_{i}")
                            for i in range(num_layers)] if self.batch_norm else []
        self.activation_layers = [keras.layers.PReLU(alpha_initializer=keras.initializers.Constant(0.25),
                                                     shared_axes=[1], dtype=policy, name=f"prelu_{i}")
                                  for i in range(num_layers)]
        self.dropout_layers = [Dropout(self.dropout, seed=sub_seed(i, 1), dtype=policy,
                                                    name=f"dropout_{i}")
                               for i in range(num_layers)] if self.dropout > 0 else []
        self.output_layer = keras.layers.Dense(1, kernel_initializer=self.kernel_initializer,
                                               kernel_regularizer=self.kernel_regularizer,
                                               dtype=policy.variable_dtype, name="logit")

    def build(self, input_shape):
        shape = tuple(input_shape)
        if len(shape) != 2 or shape[-1] is None:
            raise ValueError(f"QuadraticNeuralNetwork expects inputs [batch, D] with known D. Received: {shape}")
        for i in range(self.num_layers):
            self.quadratic_layers[i].build(shape)
            if self.norm_layers:
                self.norm_layers[i].build(shape)
            self.activation_layers[i].build(shape)
            if self.dropout_layers:
                self.dropout_layers[i].build(shape)
        self.output_layer.build(shape)
        self.built = True

    def call(self, inputs, training=None):
        x = inputs
        for i in range(self.num_layers):
            h = self.quadratic_layers[i](x, training=training)
            if self.norm_layers:
                h = self.norm_layers[i](h, training=training)
            h = self.activation_layers[i](h)
            if self.dropout_layers:
                h = self.dropout_layers[i](h, training=training)
            x = x + h
        return self.output_layer(x)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 1)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_layers=self.num_layers,
            num_row=self.num_row,
            dropout=self.dropout,
            batch_norm=self.batch_norm,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            kernel_regularizer=keras.regularizers.serialize(self.kernel_regularizer),
            seed=self.seed,
        )
        return config
