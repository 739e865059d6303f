"""batchscope: the science and practice of batch size in deep learning."""

__version__ = "0.1.0"
