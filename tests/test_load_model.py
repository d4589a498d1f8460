"""Self-contained checkpoints: ``load_from_checkpoint(path)`` with no config, for every switch;
``load_model`` for run folders and older checkpoints."""

from __future__ import annotations

import pytest
import torch

from swin_lightning.classifier import SwinClassifier
from swin_lightning.load import load_model
from swin_lightning.models import SwinTransformer
from swin_lightning.models.net_spec import DATA_KEY, NET_KEY, build_net, net_spec
from swin_lightning.simmim import SimMIM
from swin_lightning.storage import CheckpointError
from tests.conftest import save_like_lightning

SMALL = {"embed_dim": 16, "depths": [2, 2], "num_heads": [1, 2], "num_classes": 5}
# fmt: off
SHAPES = {
    "v1": {**SMALL, "img_size": 32, "patch_size": 2, "window_size": 4},
    "v1 non-square, abs+rel": {
        **SMALL,
        "img_size": (32, 48),
        "patch_size": 4,
        "window_size": 4,
        "pos_embed": "abs+rel",
    },
    "v2": {
        **SMALL,
        "img_size": 32,
        "patch_size": 2,
        "window_size": 4,
        "block_norm": "post",
        "attention": "cosine",
        "pos_embed": "cpb",
        "merge_norm": "post",
    },
    "v2 window transfer": {
        **SMALL,
        "img_size": 32,
        "patch_size": 2,
        "window_size": 4,
        "attention": "cosine",
        "pos_embed": "cpb",
        "pretrained_window_size": [2, 2],
    },
    "conv stem, no shift": {
        **SMALL,
        "img_size": 32,
        "patch_size": 2,
        "window_size": 4,
        "stem": "conv",
        "shift": False,
    },
    "mlp mixer": {**SMALL, "img_size": 32, "patch_size": 2, "window_size": 4, "mixer": "mlp",
                  "pos_embed": "none"},
}

@pytest.mark.parametrize("shape", list(SHAPES))
def test_load_from_checkpoint_needs_no_config_for_every_switch(shape, tmp_path):
    torch.manual_seed(0)
    model = SwinClassifier(SwinTransformer(**SHAPES[shape]), label_smoothing=0.2).eval()
    save_like_lightning(model, tmp_path / "m.ckpt")
    loaded = SwinClassifier.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True).eval()
    assert loaded.hparams.label_smoothing == 0.2
    assert loaded.net.init_args == model.net.init_args
    h, w = model.net.img_size
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_simmim_load_from_checkpoint_keeps_the_encoder_without_its_head(tmp_path):
    torch.manual_seed(0)
    model = SimMIM(SwinTransformer(**SHAPES["v1"]), mask_ratio=0.5).eval()
    save_like_lightning(model, tmp_path / "m.ckpt")
    loaded = SimMIM.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True).eval()
    assert loaded.net.num_classes == 0 and loaded.hparams.mask_ratio == 0.5
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.net(x), model.net(x))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_checkpoint_from_before_is_refused_with_the_way_that_works(tmp_path):
    model = SwinClassifier(SwinTransformer(**SHAPES["v1"]))
    save_like_lightning(model, tmp_path / "old.ckpt")
    checkpoint = torch.load(tmp_path / "old.ckpt", weights_only=True)
    del checkpoint[NET_KEY]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.raises(CheckpointError) as err:
        SwinClassifier.load_from_checkpoint(tmp_path / "old.ckpt")
    message = str(err.value)
    assert "\n" not in message and "swin_lightning.load_model(" in message
    assert "config.yaml" in message and "net=" in message
    # net= given by the caller: Lightning's own loading, as before
    net = SwinTransformer(**SHAPES["v1"])
    assert SwinClassifier.load_from_checkpoint(tmp_path / "old.ckpt", net=net).net is net


def test_a_network_class_outside_the_package_is_not_built():
    with pytest.raises(CheckpointError, match="not one of swin_lightning's"):
        build_net({"class_path": "os.system", "init_args": {"command": "true"}})
    spec = net_spec(SwinTransformer(**SHAPES["v2"]))
    assert spec["class_path"] == "swin_lightning.models.swin.SwinTransformer"
    assert build_net(spec).init_args == spec["init_args"]


def test_load_model_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint or run folder"):
        load_model(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match=r"without checkpoints/last\.ckpt"):
        load_model(tmp_path)
    model = SwinClassifier(SwinTransformer(**SHAPES["v1"]))
    save_like_lightning(model, tmp_path / "no_data.ckpt")  # saved outside a Trainer
    checkpoint = torch.load(tmp_path / "no_data.ckpt", weights_only=True)
    assert DATA_KEY not in checkpoint
    with pytest.raises(CheckpointError, match="records no evaluation transform"):
        load_model(tmp_path / "no_data.ckpt")
