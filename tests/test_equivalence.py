"""Same weights, same logits: the project's Swin against timm's and torchvision's."""

import re

import pytest
import timm
import torch
import torchvision

from swin_lightning.models import create_model, load_pretrained

ATOL = 1e-4


def logits_close(ours, theirs, x):
    ours.eval(), theirs.eval()
    with torch.no_grad():
        diff = (ours(x) - theirs(x)).abs().max().item()
    assert diff <= ATOL, f"max abs logit difference {diff:.2e} > {ATOL}"


def test_timm_swin_tiny():
    torch.manual_seed(0)
    theirs = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    ours = create_model("swin_t")
    assert load_pretrained(ours, theirs.state_dict()).layout == "timm"
    logits_close(ours, theirs, torch.randn(2, 3, 224, 224))


def test_torchvision_swin_t():
    torch.manual_seed(0)
    theirs = torchvision.models.swin_t()
    ours = create_model("swin_t")
    assert load_pretrained(ours, theirs.state_dict()).layout == "torchvision"
    logits_close(ours, theirs, torch.randn(2, 3, 224, 224))


def test_cifar_preset_against_timm_with_same_arguments():
    torch.manual_seed(0)
    theirs = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=32,
        patch_size=2,
        window_size=4,
        num_classes=10,
    )
    ours = create_model("swin_cifar", num_classes=10)
    load_pretrained(ours, theirs.state_dict())
    logits_close(ours, theirs, torch.randn(4, 3, 32, 32))


@pytest.mark.slow
def test_padded_windows_against_torchvision():
    # 256 px: stage grids 64/32/16/8 are not multiples of window 7, so every stage pads,
    # and the shift mask is built on the padded grid as in the reference code.
    torch.manual_seed(0)
    theirs = torchvision.models.swin_t()
    ours = create_model("swin_t", img_size=256)
    load_pretrained(ours, theirs.state_dict())
    logits_close(ours, theirs, torch.randn(1, 3, 256, 256))


def to_official_layout(timm_state: dict) -> dict:
    """The official Microsoft layout: merging at the end of a stage, plain head, saved buffers."""
    out = {}
    for k, v in timm_state.items():
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", k)
        out[k.replace("head.fc.", "head.")] = v
        if k.endswith("relative_position_bias_table"):
            out[k.replace("bias_table", "index")] = torch.zeros(49, 49, dtype=torch.long)
    return {"model": out}


def test_official_layout():
    torch.manual_seed(0)
    theirs = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    ours = create_model("swin_t")
    report = load_pretrained(ours, to_official_layout(theirs.state_dict()))
    assert report.layout == "official" and not report.missing and not report.unexpected
    logits_close(ours, theirs, torch.randn(1, 3, 224, 224))


# Swin V2: timm's and torchvision's initialisations leave biases at zero and every logit
# scale at log(10); random offsets make every weight matter to the comparison.
def randomized(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(torch.randn_like(param) * (0.5 if "logit_scale" in name else 0.02))
    return model


def test_timm_swinv2_tiny_window8():
    torch.manual_seed(0)
    theirs = randomized(timm.create_model("swinv2_tiny_window8_256", pretrained=False))
    ours = create_model("swinv2_t")
    report = load_pretrained(ours, theirs.state_dict())
    assert report.layout == "timm" and not report.adapted
    logits_close(ours, theirs, torch.randn(2, 3, 256, 256))


def test_torchvision_swin_v2_t():
    # torchvision keeps a full qkv bias (its key third zeroed at every forward): randomized
    # here, so the converter must drop that third as torchvision does.
    torch.manual_seed(0)
    theirs = randomized(torchvision.models.swin_v2_t())
    ours = create_model("swinv2_t")
    assert load_pretrained(ours, theirs.state_dict()).layout == "torchvision"
    logits_close(ours, theirs, torch.randn(2, 3, 256, 256))


def test_official_swinv2_layout():
    torch.manual_seed(0)
    theirs = randomized(timm.create_model("swinv2_tiny_window8_256", pretrained=False))
    official = to_official_layout(theirs.state_dict())
    for k in [k for k in official["model"] if k.endswith("relative_position_bias_table")]:
        del official["model"][k], official["model"][k.replace("bias_table", "index")]
    for k in [k for k in official["model"] if k.endswith("cpb_mlp.0.weight")]:
        official["model"][k.replace("cpb_mlp.0.weight", "relative_coords_table")] = torch.zeros(
            1, 15, 15, 2
        )  # saved by the official code as a buffer; derived here
    ours = create_model("swinv2_t")
    report = load_pretrained(ours, official)
    assert report.layout == "official" and not report.missing and not report.unexpected
    logits_close(ours, theirs, torch.randn(1, 3, 256, 256))


def test_swinv2_window_transfer_matches_timm():
    # Window-8 weights in a window-16 model that knows they were trained at window 8
    # (timm's pretrained_window_sizes): the MLP's weights transfer as they are.
    torch.manual_seed(0)
    trained = randomized(timm.create_model("swinv2_tiny_window8_256", pretrained=False))
    theirs = timm.create_model(
        "swinv2_tiny_window16_256", pretrained=False, pretrained_window_sizes=(8, 8, 8, 8)
    )
    theirs.load_state_dict(trained.state_dict())
    ours = create_model("swinv2_t_w16", pretrained_window_size=8)
    report = load_pretrained(ours, trained.state_dict())
    assert not report.adapted and not report.missing
    logits_close(ours, theirs, torch.randn(1, 3, 256, 256))
