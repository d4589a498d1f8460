"""``export``: ONNX (run in onnxruntime) and torch.export programs give PyTorch's logits."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import yaml

from swin_lightning.export import build_network, main, run_config
from swin_lightning.storage import load_checkpoint
from tests.conftest import CONFIGS, TINY_DEMO, run_cli

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
