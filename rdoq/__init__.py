"""RDOQ: fine-grained mixed-precision post-training quantization by rate-distortion optimization."""

__version__ = "0.1.0"
