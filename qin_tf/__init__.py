"""qin-tf: the Quadratic Interest Network (QIN) for multimodal CTR prediction in TensorFlow."""

__version__ = "0.1.0"
