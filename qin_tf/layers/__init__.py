"""The Keras layers of QIN and of the DIN baseline.

Importing this package registers every layer with Keras (package
``"qin_tf"``), so a saved ``.keras`` model loads without ``custom_objects``.
"""

from qin_tf.layers.attention import AdaptiveSparseTargetAttention, DINAttention
from qin_tf.layers.embedding import ContextEmbedding, ItemEmbedding
from qin_tf.layers.mlp import MLPBlock
from qin_tf.layers.qnn import QuadraticLayer, QuadraticNeuralNetwork

__all__ = [
    "AdaptiveSparseTargetAttention",
    "ContextEmbedding",
    "DINAttention",
    "ItemEmbedding",
    "MLPBlock",
    "QuadraticLayer",
    "QuadraticNeuralNetwork",
]
