"""melrecon: memory-efficient learning for high-dimensional unrolled MRI reconstruction."""

__version__ = "0.1.0"
