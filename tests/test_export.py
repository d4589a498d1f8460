"""``export``: ONNX (run in onnxruntime) and torch.export programs give PyTorch's logits."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from swin_lightning.export import build_network, main, run_config
from swin_lightning.models.net_spec import DATA_KEY, NET_KEY
from swin_lightning.storage import load_checkpoint
from tests.conftest import CONFIGS, REPO, TINY_DEMO, load_elsewhere, run_cli, save_like_lightning

ort = pytest.importorskip("onnxruntime", reason="the export extra is in dev; CI installs it")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    run_cli(
        "fit", *TINY_DEMO, "--trainer.max_epochs=1", f"--trainer.logger.init_args.save_dir={root}"
    )
    ckpt = next(root.rglob("last.ckpt"))
    net = build_network(run_config(ckpt, None), load_checkpoint(ckpt)["state_dict"], None)
    return ckpt, net


@pytest.mark.parametrize("size", [None, [32, 48]], ids=["square", "non-square"])
def test_onnx_in_onnxruntime_equals_pytorch(trained, tmp_path, size, capsys):
    ckpt, _ = trained
    out = tmp_path / "model.onnx"
    args = ["--ckpt_path", str(ckpt), "--format", "onnx", "--out", str(out)]
    assert main([*args, *(["--image_size", *map(str, size)] if size else [])]) == 0
    assert "(ok)" in capsys.readouterr().out
    h, w = size or (32, 32)
    net = build_network(run_config(ckpt, None), load_checkpoint(ckpt)["state_dict"], [h, w])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 3, h, w)
        got = session.run(None, {"images": x.numpy()})[0]
        with torch.no_grad():
            want = net(x).numpy()
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_pt2_program_equals_pytorch(trained, tmp_path):
    ckpt, net = trained
    out = tmp_path / "model.pt2"
    assert main(["--ckpt_path", str(ckpt), "--format", "pt2", "--out", str(out)]) == 0
    program = torch.export.load(out).module()
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(program(x), net(x), atol=1e-5, rtol=0)


def test_export_errors_are_one_line(trained, tmp_path, capsys):
    ckpt, _ = trained
    alone = tmp_path / "alone.ckpt"  # a checkpoint copied away from its run folder
    shutil.copy(ckpt, alone)
    args = ["--format", "pt2", "--out", str(tmp_path / "m.pt2")]
    assert main(["--ckpt_path", str(alone), *args]) == 0  # it holds its network
    capsys.readouterr()
    checkpoint = torch.load(alone, weights_only=True)
    del checkpoint[NET_KEY]  # as written before checkpoints held their network
    torch.save(checkpoint, alone)
    assert main(["--ckpt_path", str(alone), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no run config") and "--config" in err
    damaged = tmp_path / "run" / "checkpoints" / "last.ckpt"
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(ckpt.read_bytes()[:1000])
    assert main(["--ckpt_path", str(damaged), *args]) == 1
    assert capsys.readouterr().err.startswith("error:")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["--ckpt_path", str(ckpt), "--format", "pt2", "--out", str(blocker / "m.pt2")]) == 1
    assert str(blocker / "m.pt2") in capsys.readouterr().err
    assert main(["--ckpt_path", str(ckpt), *args, "--image_size", "31"]) == 1  # odd: not / patch 2
    assert "error:" in capsys.readouterr().err


def test_weights_of_another_network_name_the_keys_and_both_shapes(trained, tmp_path, capsys):
    ckpt, _ = trained
    config = yaml.safe_load((ckpt.parent.parent / "config.yaml").read_text())
    config["model"]["net"]["init_args"]["embed_dim"] *= 2  # another run's config
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(config))
    args = ["--ckpt_path", str(ckpt), "--config", str(other), "--format", "pt2"]
    assert main([*args, "--out", str(tmp_path / "m.pt2")]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    width = config["model"]["net"]["init_args"]["embed_dim"]
    assert f"patch_embed.proj.weight: the checkpoint has ({width // 2}, 3," in err
    assert f"the config's network ({width}, 3," in err and "pass --config" in err
    assert not (tmp_path / "m.pt2").exists()


def test_a_classifier_checkpoint_is_not_resumed_as_simmim_pretraining(trained, in_tmp, capsys):
    ckpt, _ = trained
    with pytest.raises(SystemExit) as stop:
        run_cli("fit", "--config", str(CONFIGS / "simmim" / "pretrain_demo.yaml"),
                f"--ckpt_path={ckpt}")  # fmt: skip
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --ckpt_path"), err
    assert "classifier's checkpoint" in err
    assert not (in_tmp / "logs").exists()


def test_a_run_loads_from_its_checkpoint_alone_in_a_new_process(trained, tmp_path):
    """The logits of the run's own evaluation network (built from its config.yaml and
    last.ckpt), from load_from_checkpoint and load_model with no config in sight."""
    ckpt, net = trained
    x = torch.randn(3, 3, 32, 32)
    got = load_elsewhere("classifier", "SwinClassifier", ckpt, x, tmp_path)
    with torch.no_grad():
        want = net(x)
    assert torch.equal(got["module"], want) and torch.equal(got["load_model"], want)


def test_load_model_gives_the_runs_eval_transform_and_classes(trained, tmp_path):
    from PIL import Image

    from swin_lightning.data import EmbeddedShapesDataModule
    from swin_lightning.load import load_model

    ckpt, _ = trained
    model = load_model(ckpt.parent.parent)  # the run folder: its last.ckpt
    datamodule = EmbeddedShapesDataModule()
    assert model.classes == list(datamodule.classes) and len(model.classes) == 10
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), np.uint8))
    assert torch.allclose(model.transform(image), datamodule.eval_transform()(image), atol=1e-6)
    assert not model.net.training
    # A checkpoint from before (no network inside) still loads, through the run's config.yaml.
    old = ckpt.parent / "old.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    del checkpoint[NET_KEY], checkpoint[DATA_KEY]
    torch.save(checkpoint, old)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_model(old).net(x), model.net(x))
    assert load_model(old).classes == model.classes


# ------------------------------------------------------------ timm, Hugging Face, torchvision
V2 = {"block_norm": "post", "attention": "cosine", "pos_embed": "cpb", "merge_norm": "post"}


def v2_checkpoint(folder, **switches):
    """A self-contained checkpoint of a small Swin V2 classifier (random weights)."""
    from swin_lightning.classifier import SwinClassifier
    from swin_lightning.models import SwinTransformer

    torch.manual_seed(0)
    net = SwinTransformer(img_size=32, patch_size=2, embed_dim=16, depths=[2, 2],
                          num_heads=[1, 2], window_size=4, num_classes=3, **{**V2, **switches})  # fmt: skip
    for p in net.parameters():  # away from the initialization, so every weight shows
        p.data.normal_(0, 0.2)
    path = folder / "v2.ckpt"
    data = {"eval_transform": {"input_size": [3, 32, 32], "interpolation": "bicubic",
                               "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 1.0},
            "classes": ["cat", "dog", "emu"]}  # fmt: skip
    save_like_lightning(SwinClassifier(net), path, **{DATA_KEY: data})
    return path, net.eval()


def read_back(fmt: str, folder):
    """The library's own loading of an export folder, as docs/export.md shows it."""
    if fmt == "timm":
        import timm

        return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    if fmt == "hf":
        from transformers import AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(str(folder)).eval()
        return lambda x: model(pixel_values=x).logits
    from swin_lightning.library_files import read_torchvision

    return read_torchvision(folder)


@pytest.mark.parametrize("fmt", ["timm", "hf", "torchvision"])
@pytest.mark.parametrize("version", ["V1", "V2"])
def test_library_formats_read_back_give_our_logits(fmt, version, trained, tmp_path, capsys):
    if fmt == "hf":
        pytest.importorskip("transformers", reason="the hf extra is in dev; CI installs it")
    if version == "V1":  # the trained demo run
        ckpt, net = trained
        classes = load_checkpoint(ckpt)[DATA_KEY]["classes"]
    else:
        ckpt, net = v2_checkpoint(tmp_path)
        classes = ["cat", "dog", "emu"]
    out = tmp_path / f"{fmt}_export"
    assert main(["--ckpt_path", str(ckpt), "--format", fmt, "--out", str(out)]) == 0
    assert f"read back with {fmt}" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    model = read_back(fmt, out)
    for batch in (1, 4):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(model(x), net(x), atol=1e-4, rtol=0)
    config = json.loads((out / "config.json").read_text())
    if fmt == "timm":
        cfg = model.pretrained_cfg  # as timm read it from config.json
        assert list(cfg["label_names"]) == classes and tuple(cfg["input_size"]) == (3, 32, 32)
        assert cfg["num_classes"] == len(classes) and config["label_names"] == classes
    elif fmt == "hf":
        assert config["id2label"] == {str(i): c for i, c in enumerate(classes)}
        assert config["model_type"] == ("swin" if version == "V1" else "swinv2")
    else:
        assert config["classes"] == classes and config["swin_version"] == int(version[1])


def test_a_network_a_library_cannot_express_is_refused_in_one_line(tmp_path, capsys):
    ckpt, _ = v2_checkpoint(tmp_path, pretrained_window_size=[2, 2])
    out = tmp_path / "tv"
    assert main(["--ckpt_path", str(ckpt), "--format", "torchvision", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no pretrained_window_size" in err and not out.exists()
    ckpt, _ = v2_checkpoint(tmp_path, block_norm="pre")  # a V1/V2 mix
    assert main(["--ckpt_path", str(ckpt), "--format", "timm", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "block_norm='pre'" in err and "onnx or pt2" in err
    assert not out.exists() and not list(tmp_path.glob(".tv.*"))


def test_the_snippets_of_docs_export_md_run_on_a_trained_run(trained, in_tmp):
    """Every Python snippet of docs/export.md's loading and library sections, as written, in
    a new process, on the trained demo run laid out where the docs say."""
    text = (REPO / "docs" / "export.md").read_text().split("## ONNX and torch.export")[0]
    snippets = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(snippets) == 5
    ckpt, _ = trained
    shutil.copytree(ckpt.parent.parent, in_tmp / "logs" / "demo" / "version_0")
    for fmt in ("timm", "hf", "torchvision"):
        assert main(["--ckpt_path", "logs/demo/version_0/checkpoints/last.ckpt", "--format",
                     fmt, "--out", str(in_tmp / f"demo_{fmt}")]) == 0  # fmt: skip
    done = subprocess.run([sys.executable, "-c", "\n".join(snippets)], cwd=in_tmp,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    classes = load_checkpoint(ckpt)[DATA_KEY]["classes"]
    lines = done.stdout.splitlines()
    assert lines[0].split(" ")[0] in classes  # load_model's top class
    assert str(classes[:3]) in done.stdout  # timm's and torchvision's class names
