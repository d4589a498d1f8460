"""``analyze`` on a tiny trained run, test-time augmentation, and the class-activation maps."""

from __future__ import annotations

import csv

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from swin_lightning.analyze import _datamodule, _loader, expected_calibration_error, main
from swin_lightning.cam import attention_rollout, grad_cam, rollout_matrix
from swin_lightning.classifier import SwinClassifier
from swin_lightning.export import run_config
from swin_lightning.load import load_model
from swin_lightning.models import SwinTransformer
from swin_lightning.tta import tta_probs
from tests.conftest import TINY_DEMO, run_cli

pytest.importorskip("pytorch_grad_cam", reason="the analysis extra is in dev; CI installs it")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    run_cli("fit", *TINY_DEMO, f"--trainer.logger.init_args.save_dir={root}")
    return next(root.rglob("last.ckpt")).parent.parent


def test_analyze_writes_its_files_and_the_confusion_matrix_is_a_hand_count(run, capsys):
    assert main(["--ckpt_path", str(run), "--k", "4", "--cams", "1", "--temperature"]) == 0
    out = run / "analysis" / "val"
    assert str(out / "analysis.md") in capsys.readouterr().out
    for name in ("confusion.png", "reliability.png", "worst.png", "best.png", "cams.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    with open(out / "confusion.csv", newline="") as f:
        rows = list(csv.reader(f))
    classes = rows[0][1:]
    counted = torch.tensor([[int(v) for v in row[1:]] for row in rows[1:]])
    # By hand: the run's network on its val split, one image at a time.
    model = load_model(run)
    _, _, dataset = _loader(_datamodule(run_config(run / "checkpoints" / "last.ckpt",
                                                               None)), "val")  # fmt: skip
    hand = torch.zeros(len(classes), len(classes), dtype=torch.long)
    with torch.no_grad():
        for i in range(len(dataset)):
            image, label = dataset[i]
            hand[label, int(model.net(image[None]).argmax())] += 1
    assert int(counted.sum()) == len(dataset) == 32
    assert torch.equal(counted, hand)
    text = (out / "analysis.md").read_text()
    assert "| plain |" in text and "| TTA flip |" in text and "fitted on val" in text
    top1 = 100 * hand.diag().sum().item() / len(dataset)
    assert f"| plain | {top1:.2f} |" in text
    events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {"analysis/val/confusion", "analysis/val/cams"} <= set(events.Tags()["images"])
    assert "analysis/val/top1_tta_flip" in events.Tags()["scalars"]


def test_analyze_errors_are_one_line(run, tmp_path, capsys):
    alone = tmp_path / "alone.ckpt"  # a checkpoint away from its run: no data to analyze
    alone.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    assert main(["--ckpt_path", str(alone)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: no run config")
    assert main(["--ckpt_path", str(tmp_path / "missing")]) == 2
    assert "no such checkpoint or run folder" in capsys.readouterr().err


def test_expected_calibration_error_equals_a_hand_computed_value():
    # Four predictions with confidences 0.9, 0.8, 0.6 and 0.7, each alone in one of 15 bins.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
    targets = torch.tensor([0, 1, 1, 0])  # right, wrong, right, wrong
    # Each prediction sits alone in its bin: ECE = mean |accuracy - confidence| over images.
    hand = (abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.6) + abs(0 - 0.7)) / 4
    assert expected_calibration_error(probs, targets) == pytest.approx(hand, abs=1e-6)
    same_bin = torch.tensor([[0.9, 0.1], [0.91, 0.09]])  # one bin: |0.5 - 0.905|
    assert expected_calibration_error(same_bin, torch.tensor([0, 1])) == pytest.approx(0.405)


def test_flip_tta_leaves_a_flip_symmetric_model_alone_and_moves_a_real_one(run):
    net = load_model(run).net
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():

        def symmetric(v):
            return net(v) + net(v.flip(-1))

        plain = symmetric(x).softmax(-1)
        assert torch.allclose(tta_probs(symmetric, x, "flip"), plain, atol=1e-6)
        real = net(x).softmax(-1)
        assert not torch.allclose(tta_probs(net, x, "flip"), real, atol=1e-4)
        assert not torch.allclose(tta_probs(net, x, "flip_zoom"), tta_probs(net, x, "flip"))
    model = SwinClassifier(net, tta="flip").eval()
    with torch.no_grad():
        assert torch.allclose(model.eval_logits(x).exp(), tta_probs(net, x, "flip"), atol=1e-6)
    with pytest.raises(ValueError, match=r"model\.tta='flop' is not one of none, flip"):
        SwinClassifier(SwinTransformer(img_size=32, patch_size=2, embed_dim=16, depths=[2],
                                       num_heads=[1], window_size=4, num_classes=3), tta="flop")  # fmt: skip


def test_tta_is_a_test_key_of_the_cli(run, in_tmp):
    args = ["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints"
            / "last.ckpt"), "--trainer.logger=false"]  # fmt: skip
    plain = run_cli(*args).trainer.callback_metrics["test/loss"]
    flipped = run_cli(*args, "--model.tta=flip").trainer.callback_metrics["test/loss"]
    assert float(plain) != float(flipped)


def small_net(shift: bool, stages: int = 2) -> SwinTransformer:
    torch.manual_seed(0)
    return SwinTransformer(img_size=32, patch_size=2, embed_dim=16, depths=[2] * stages,
                           num_heads=[1, 2][:stages], window_size=4, num_classes=5,
                           shift=shift).eval()  # fmt: skip


def test_cams_have_the_image_shape_and_follow_the_object():
    net = small_net(shift=True)
    x = torch.zeros(2, 3, 32, 32)
    x[0, :, 2:10, 2:10] = 3  # an object top left
    x[1, :, 20:28, 20:28] = 3  # the same object bottom right
    for maps in (grad_cam(net, x, [0, 0]), attention_rollout(net, x)):
        assert maps.shape == (2, 32, 32) and maps.isfinite().all()
        assert maps.min() >= 0 and maps.max() <= 1
    cam = grad_cam(net, x, [0, 0])
    rows = torch.arange(32.0)[:, None].expand(32, 32)
    centre = [(m * rows).sum() / m.sum() for m in cam]
    assert centre[1] - centre[0] > 5  # the map moved down with the object


def test_rollout_crosses_window_borders_only_with_shifted_windows():
    x = torch.randn(1, 3, 32, 32)
    for shift in (False, True):
        net = small_net(shift, stages=1)  # one stage: 16x16 tokens in windows of 4x4
        rollout, grid = rollout_matrix(net, x)
        assert grid == (16, 16) and rollout.shape == (1, 256, 256)
        token = 5 * 16 + 5  # row 5, column 5: the window of rows and columns 4-7
        weights = rollout[0, token].view(16, 16)
        outside = weights.clone()
        outside[4:8, 4:8] = 0
        assert torch.allclose(rollout[0].sum(-1), torch.ones(256, dtype=rollout.dtype))
        if shift:
            assert outside.sum() > 0.05  # SW-MSA brought in tokens of other windows
        else:
            assert outside.abs().sum() < 1e-9  # W-MSA alone never leaves the window
