"""swin_lightning: config-driven Swin Transformer experiments on PyTorch Lightning."""

__version__ = "0.1.0"
