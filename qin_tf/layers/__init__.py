"""The Keras layers of QIN, of the DIN baseline and of the challenge winner's Transformer + DCNv2.

Importing this package registers every layer with Keras (package
``"qin_tf"``), so a saved ``.keras`` model loads without ``custom_objects``.
"""

from qin_tf.layers.attention import AdaptiveSparseTargetAttention, DINAttention
from qin_tf.layers.cross import CrossNetwork
from qin_tf.layers.dropout import Dropout
from qin_tf.layers.embedding import ContextEmbedding, ItemEmbedding
from qin_tf.layers.mlp import MLPBlock
from qin_tf.layers.qnn import QuadraticLayer, QuadraticNeuralNetwork
from qin_tf.layers.transformer import TargetTransformer

__all__ = [
    "AdaptiveSparseTargetAttention",
    "ContextEmbedding",
    "CrossNetwork",
    "DINAttention",
    "Dropout",
    "ItemEmbedding",
    "MLPBlock",
    "QuadraticLayer",
    "QuadraticNeuralNetwork",
    "TargetTransformer",
]
