"""Weight files: formats, safety, and clear reports of what does not fit."""

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from swin_lightning.models import create_model, load_pretrained


@pytest.fixture
def source_and_target():
    torch.manual_seed(0)
    source = create_model("swin_cifar", num_classes=10)
    torch.manual_seed(1)
    target = create_model("swin_cifar", num_classes=10)
    return source, target


def assert_same_weights(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
def test_torch_files(tmp_path, source_and_target, suffix):
    source, target = source_and_target
    path = tmp_path / f"weights{suffix}"
    torch.save(source.state_dict(), path)
    load_pretrained(target, path)
    assert_same_weights(source, target)


def test_safetensors_file(tmp_path, source_and_target):
    source, target = source_and_target
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), str(path))
    load_pretrained(target, str(path))
    assert_same_weights(source, target)


def test_lightning_checkpoint_with_prefix(tmp_path, source_and_target):
    source, target = source_and_target
    state = {f"model.{k}": v for k, v in source.state_dict().items()}
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    assert load_pretrained(target, path).layout == "swin_lightning"
    assert_same_weights(source, target)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickled_code_is_refused(tmp_path, source_and_target, monkeypatch):
    _, target = source_and_target
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _RunsCode()}, f)
    with pytest.raises(ValueError, match="refused to load"):
        load_pretrained(target, path)
    assert not (tmp_path / "pwned").exists()


def test_unknown_suffix_and_missing_file(tmp_path, source_and_target):
    _, target = source_and_target
    with pytest.raises(FileNotFoundError, match="pretrained weights not found"):
        load_pretrained(target, tmp_path / "nope.pth")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"expected one of \.pth, \.pt, \.bin"):
        load_pretrained(target, tmp_path / "w.npz")


def test_shape_mismatch_lists_keys(source_and_target):
    _, target = source_and_target
    other = create_model("swin_cifar", num_classes=100)
    with pytest.raises(
        ValueError, match=r"head\.weight: checkpoint \(100, 768\) vs model \(10, 768\)"
    ):
        load_pretrained(target, other.state_dict())


def test_missing_and_unexpected_keys_are_reported(source_and_target):
    source, target = source_and_target
    state = source.state_dict()
    del state["norm.weight"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing in checkpoint \(1\): norm\.weight"):
        load_pretrained(target, state)
    report = load_pretrained(target, state, strict=False)
    assert report.missing == ["norm.weight"] and report.unexpected == ["extra.weight"]
