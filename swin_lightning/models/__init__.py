"""From-scratch Swin Transformer, its presets, FLOP counting and weight loading."""

from swin_lightning.models.compile import compile_network
from swin_lightning.models.features import SwinFeatures
from swin_lightning.models.flops import count_flops, count_macs
from swin_lightning.models.presets import PRESETS, create_model, preset_kwargs
from swin_lightning.models.pretrained import LoadReport, convert_state_dict, load_pretrained
from swin_lightning.models.swin import SwinTransformer

__all__ = [
    "PRESETS",
    "LoadReport",
    "SwinFeatures",
    "SwinTransformer",
    "compile_network",
    "convert_state_dict",
    "count_flops",
    "count_macs",
    "create_model",
    "load_pretrained",
    "preset_kwargs",
]
