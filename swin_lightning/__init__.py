"""swin_lightning: config-driven Swin Transformer experiments on PyTorch Lightning."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # load_model imports torch and timm: only when it is asked for, not on `import swin_lightning`.
    if name == "load_model":
        from swin_lightning.load import load_model

        return load_model
    raise AttributeError(f"module 'swin_lightning' has no attribute {name!r}")
