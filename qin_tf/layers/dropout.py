"""Inverted dropout that keeps its rate in every dtype policy, at half the random bits."""

from __future__ import annotations

import keras
import tensorflow as tf

#: Random bits per unit: two units per 32-bit word of the Philox generator.
BITS = 16
_LEVELS = 1 << BITS


def keep_threshold(rate: float) -> int:
    """The 16-bit level below which a unit is dropped: ``round(rate * 2**16)``."""
    return int(round(float(rate) * _LEVELS))


def keep_probability(rate: float) -> float:
    """The probability that :class:`Dropout` keeps a unit at ``rate`` (``1 - t / 2**16``)."""
    return 1.0 - keep_threshold(rate) / _LEVELS


@keras.saving.register_keras_serializable(package="qin_tf")
class Dropout(keras.layers.Dropout):
    """``keras.layers.Dropout`` whose keep probability and rescale do not depend on the dtype.

    Keras draws a dropout's uniform numbers in the layer's compute dtype. Under
    ``mixed_bfloat16`` a bfloat16 uniform takes only 128 values, so rate 0.1
    keeps 0.8984 of the units instead of 0.9, and the rescale ``1 / 0.9``
    rounds to 1.109375: every such dropout shrinks the mean of what it passes
    by 0.3% in training, a shift inference does not have. This layer draws 16
    random bits per unit instead (two units per 32-bit Philox word: half the
    generator work of a float32 uniform), drops a unit when its bits are below
    ``t = round(rate * 2**16)``, and multiplies the kept ones by ``2**16 / (2**16
    - t)`` in float32, then rounds to the compute dtype. The kept units' expected
    sum is the input's in every policy; the rate is ``t / 2**16`` (0.1 ->
    0.1000061, within 1e-5 of any rate).

    Same arguments, configuration, seed generator and weights as
    ``keras.layers.Dropout`` (a checkpoint written with either loads into the
    other); a different random stream.

    ``rescale_in_float32 = False`` (a class attribute) rescales in the compute
    dtype instead: under ``mixed_bfloat16`` that is faster, but ``1 / 0.9``
    rounds to 1.109375 and the kept units' mean is 0.16% low; it is kept only
    as a measured lever (BENCHMARKS.md).

    Example:

    >>> y = Dropout(0.5, seed=1)(np.ones((2, 4)), training=True)
    >>> set(np.asarray(y).ravel().tolist()) <= {0.0, 2.0}
    True
    """

    rescale_in_float32 = True

    def call(self, inputs, training=False):
        if not training or self.rate <= 0:
            return inputs
        threshold = keep_threshold(self.rate)
        if threshold >= _LEVELS:   # rate 1, or within 2**-17 of it
            return tf.zeros_like(inputs)
        inputs = tf.convert_to_tensor(inputs)
        if threshold == 0:         # a rate below 2**-17 drops nothing
            return inputs
        shape = tf.shape(inputs)
        if self.noise_shape is not None:
            shape = tf.stack([shape[i] if d is None else d for i, d in enumerate(self.noise_shape)])
        size = tf.reduce_prod(shape)
        # Keras keeps the generator's state in int64; the stateless ops take int32 seeds.
        seed = tf.cast(tf.math.floormod(self.seed_generator.next(), tf.int32.max - 1), tf.int32)
        words = tf.random.stateless_uniform([(size + 1) // 2], seed=seed, minval=None, maxval=None, dtype=tf.uint32)
        bits = tf.reshape(tf.bitcast(words, tf.uint16), [-1])[:size]
        keep = tf.reshape(bits >= tf.constant(threshold, tf.uint16), shape)
        scale = _LEVELS / (_LEVELS - threshold)
        if inputs.dtype in (tf.float32, tf.float64) or not self.rescale_in_float32:
            kept = inputs * tf.constant(scale, inputs.dtype)
        else:  # bfloat16 / float16: rescale in float32, round once
            kept = tf.cast(tf.cast(inputs, tf.float32) * scale, inputs.dtype)
        return tf.where(keep, kept, tf.zeros((), inputs.dtype))
