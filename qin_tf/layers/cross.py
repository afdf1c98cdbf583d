"""DCNv2's cross network from keras-rs ``FeatureCross`` layers (FuxiCTR's ``CrossNetV2``)."""

from __future__ import annotations

import keras
import keras_rs


@keras.saving.register_keras_serializable(package="qin_tf")
class CrossNetwork(keras.layers.Layer):
    """A stack of DCNv2 cross layers: ``x_{l+1} = x_0 * (x_l W_l + b_l) + x_l``.

    Each layer is a ``keras_rs.layers.FeatureCross`` (the Keras 3 successor of
    tensorflow-recommenders' ``Cross``), called as ``FeatureCross(x_0, x_l)``
    with ``diag_scale=0``: exactly FuxiCTR's ``CrossNetV2``, where ``W_l`` is
    a full ``[D, D]`` kernel with a bias. With ``projection_dim`` the kernel is
    the low-rank product ``U_l V_l`` (``[D, P]`` then ``[P, D]``, DCNv2's
    "mixture of low-rank" without the mixture).

    Args:
        num_layers: number of cross layers (the challenge winner: 3).
        projection_dim: ``None`` (full rank, DCNv2 and the winner) or the rank P.
        kernel_initializer: of every kernel (Glorot normal, as FuxiCTR's
            ``xavier_normal_``); biases start at zero.
        kernel_regularizer: optional, on every kernel.

    Input ``[batch, D]`` -> output ``[batch, D]``. Every output is a
    polynomial of degree ``num_layers + 1`` in the input.

    Example:

    >>> CrossNetwork(num_layers=2)(np.ones((3, 4))).shape
    TensorShape([3, 4])

    Reference: Wang et al., "DCN V2: Improved Deep & Cross Network", WWW 2021;
    FuxiCTR 2.3.7 ``CrossNetV2``; keras-rs ``FeatureCross``.
    """

    def __init__(self, num_layers=3, projection_dim=None, kernel_initializer="glorot_normal",
                 kernel_regularizer=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"`num_layers` must be >= 1. Received: num_layers={num_layers!r}")
        if projection_dim is not None and (not isinstance(projection_dim, int) or projection_dim < 1):
            raise ValueError(f"`projection_dim` must be >= 1 or None. Received: projection_dim={projection_dim!r}")
        self.num_layers = num_layers
        self.projection_dim = projection_dim
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.cross_layers = [
            keras_rs.layers.FeatureCross(projection_dim=projection_dim, diag_scale=0.0, use_bias=True,
                                         kernel_initializer=self.kernel_initializer, bias_initializer="zeros",
                                         kernel_regularizer=self.kernel_regularizer, dtype=self.dtype_policy,
                                         name=f"cross_{i}")
            for i in range(num_layers)]

    def build(self, input_shape):
        shape = tuple(input_shape)
        if shape[-1] is None:
            raise ValueError(f"the last dimension of the input must be known. Received: {shape}")
        for layer in self.cross_layers:
            layer.build(shape)
            # FeatureCross.build creates its Dense sublayers unnamed and unbuilt. Unnamed, their
            # variable paths would carry Keras' process-wide counter ("cross_network/dense_7/kernel")
            # and differ between a model and its clone or reload, which breaks matching weights by
            # path (export.exporter.fold_for_inference). Name and build them here, in the cross
            # layer's scope: "cross_network/cross_0/dense/kernel", and the weights exist before a
            # saved model's are loaded.
            with keras.name_scope(layer.name):
                if layer.projection_dim is not None:
                    layer.down_proj_dense.name = "down_projection"
                    layer.down_proj_dense.build(shape)
                    layer.dense.name = "dense"
                    layer.dense.build(shape[:-1] + (layer.projection_dim,))
                else:
                    layer.dense.name = "dense"
                    layer.dense.build(shape)
        self.built = True

    def call(self, inputs):
        x = inputs
        for layer in self.cross_layers:
            x = layer(inputs, x)
        return x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_layers=self.num_layers,
            projection_dim=self.projection_dim,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            kernel_regularizer=keras.regularizers.serialize(self.kernel_regularizer),
        )
        return config
