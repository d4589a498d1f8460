"""Swin as a backbone: ``create_model(..., features_only=True)`` gives timm's feature maps."""

from __future__ import annotations

import pytest
import timm
import torch

from swin_lightning.models import create_model, load_pretrained


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    torch.manual_seed(0)
    full = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    path = tmp_path_factory.mktemp("weights") / "swin_t.pth"
    torch.save(full.state_dict(), path)
    return full.state_dict(), path


def timm_features(path, **kwargs):
    return timm.create_model("swin_tiny_patch4_window7_224", features_only=True, pretrained=True,
                             pretrained_cfg_overlay={"file": str(path)}, **kwargs).eval()  # fmt: skip


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, 3)])
def test_feature_maps_equal_timms_for_the_same_weights(timm_weights, out_indices):
    state, path = timm_weights
    theirs = timm_features(path, out_indices=out_indices)
    ours = create_model("swin_t", features_only=True, out_indices=out_indices).eval()
    report = load_pretrained(ours, state)
    assert not report.missing  # every backbone weight came from timm's file
    assert ours.feature_info.channels() == theirs.feature_info.channels()
    assert ours.feature_info.reduction() == theirs.feature_info.reduction()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        got, want = ours(x), theirs(x)
    assert len(got) == len(want) == len(out_indices)
    for g, w in zip(got, want, strict=True):  # timm's swin maps are NHWC; ours NCHW
        torch.testing.assert_close(g, w.permute(0, 3, 1, 2), rtol=1e-4, atol=1e-4)


def test_any_input_size_the_windows_allow(timm_weights):
    # A non-square input (windows tile every stage): maps at strides 4..32, equal to timm's.
    # Sizes the windows do not tile are padded as torchvision does (test_equivalence.py).
    # Built for that size (img_size): whether a stage shifts depends on its grid, as in the
    # official code, which turns the shift off where a stage is one window across.
    state, path = timm_weights
    ours = create_model("swin_t", features_only=True, img_size=(448, 672)).eval()
    load_pretrained(ours, state)
    theirs = timm_features(path, img_size=(448, 672))
    x = torch.randn(1, 3, 448, 672)
    with torch.no_grad():
        got, want = ours(x), theirs(x)
    assert [tuple(m.shape[2:]) for m in got] == [(112, 168), (56, 84), (28, 42), (14, 21)]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w.permute(0, 3, 1, 2), rtol=1e-4, atol=1e-4)


def test_only_the_stages_needed_are_built_and_bad_indices_are_refused():
    ours = create_model("swin_t", features_only=True, out_indices=(0, 1))
    assert len(ours.layers) == 2 and not hasattr(ours, "head")
    assert ours.feature_info.channels() == [96, 192]
    assert create_model("swin_t", features_only=True, out_indices=(-1,)).out_indices == (3,)
    with pytest.raises(ValueError, match=r"out_indices=\(4,\).*-4\.\.3"):
        create_model("swin_t", features_only=True, out_indices=(4,))
