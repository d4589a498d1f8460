"""Runs on CUDA through the real CLI: mixed precision that learns and resumes, EMA, a SimMIM
step, export of a GPU-trained checkpoint, ``decode: device`` (nvJPEG), ``ablate --parallel 2
--share_gpus`` on one GPU and the preflight broadcast under DDP (NCCL)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from swin_lightning.export import build_network, run_config
from swin_lightning.storage import load_checkpoint
from tests.conftest import CONFIGS, REPO, TINY_DEMO, run_cli

GPU = ["--trainer.accelerator=gpu", "--trainer.devices=1"]
# The demo, big enough to learn in seconds on a GPU: 10 classes, chance is 0.1.
LEARN = [
    "--config", str(CONFIGS / "demo.yaml"), *GPU,
    "--data.init_args.train_size=2000", "--data.init_args.val_size=500",
    "--data.init_args.batch_size=64", "--trainer.max_epochs=6",
    "--trainer.log_every_n_steps=5",
]  # fmt: skip
STEPS_PER_EPOCH = 2000 // 64  # drop_last


def _last(root: Path) -> Path:
    (ckpt,) = root.rglob("last.ckpt")
    return ckpt


def _saved_logits(ckpt: Path, x: torch.Tensor) -> torch.Tensor:
    """Logits of the network rebuilt from the checkpoint and its run's config, on CUDA."""
    net = build_network(run_config(ckpt, None), load_checkpoint(ckpt)["state_dict"], None)
    with torch.no_grad():
        return net.cuda().eval()(x)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_fit_learns_resumes_and_reloads(in_tmp, precision):
    # Both learn, resume at the saved step and reload to the same logits; bf16 also trains on
    # after the resume (one fit fewer for fp16, for the GPU check's time budget).
    cli = run_cli("fit", *LEARN, f"--trainer.precision={precision}")
    trainer = cli.trainer
    assert trainer.strategy.root_device.type == "cuda"
    loss = float(trainer.callback_metrics["train/loss"])
    acc = float(trainer.callback_metrics["val/acc1"])
    assert torch.isfinite(torch.tensor(loss)), loss
    # The CPU reaches 0.48 after 5 epochs (bf16-mixed, same settings).
    assert acc > 0.3, f"val top-1 {acc:.3f} after 6 epochs (chance 0.1)"
    ckpt = _last(in_tmp)
    saved = load_checkpoint(ckpt)
    assert saved["global_step"] == 6 * STEPS_PER_EPOCH
    if precision == "16-mixed":  # the GradScaler's state travels with the checkpoint
        assert saved["MixedPrecision"]["scale"] > 0

    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32, device="cuda")
    with torch.no_grad():  # Lightning moves the model back to the CPU after fit
        live = cli.model.net.cuda().eval()(x)
    torch.testing.assert_close(_saved_logits(ckpt, x), live, atol=1e-5, rtol=0)

    # --ckpt_path last at the same max_epochs: resumes at the saved step, so trains nothing.
    same = run_cli("fit", *LEARN, f"--trainer.precision={precision}", "--ckpt_path=last")
    assert same.trainer.global_step == saved["global_step"]
    with torch.no_grad():
        torch.testing.assert_close(same.model.net.cuda().eval()(x), live, atol=1e-5, rtol=0)
    if precision != "bf16-mixed":
        return
    # One more epoch: continues from there, in the same run folder.
    more = run_cli("fit", *LEARN, f"--trainer.precision={precision}", "--ckpt_path=last",
                   "--trainer.max_epochs=7")  # fmt: skip
    assert more.trainer.global_step == 7 * STEPS_PER_EPOCH
    assert len(list(in_tmp.rglob("last.ckpt"))) == 1
    assert float(more.trainer.callback_metrics["val/acc1"]) > 0.3


def test_ema_on_gpu_validates_and_saves_the_average(in_tmp):
    from lightning.pytorch.callbacks import EMAWeightAveraging

    cli = run_cli("fit", *TINY_DEMO, *GPU, "--trainer.precision=bf16-mixed",
                  "--config", str(CONFIGS / "callbacks" / "ema.yaml"),
                  "--trainer.callbacks.init_args.decay=0.9")  # fmt: skip
    ema = next(c for c in cli.trainer.callbacks if isinstance(c, EMAWeightAveraging))
    average = ema._average_model.module.state_dict()
    assert int(ema._average_model.n_averaged) == cli.trainer.global_step == 8
    saved = load_checkpoint(_last(in_tmp))
    for key, value in average.items():
        assert torch.equal(saved["state_dict"][key], value.cpu()), key
    assert any(
        not torch.equal(saved["current_model_state"][k], saved["state_dict"][k]) for k in average
    )


def test_simmim_pretraining_steps_on_gpu(in_tmp):
    cli = run_cli(
        "fit", "--config", str(CONFIGS / "simmim" / "pretrain_demo.yaml"), *GPU,
        "--trainer.precision=bf16-mixed", "--data.init_args.train_size=64",
        "--data.init_args.val_size=32", "--data.init_args.batch_size=16",
        "--trainer.max_epochs=2", "--trainer.log_every_n_steps=1",
    )  # fmt: skip
    assert cli.trainer.global_step == 8
    losses = [float(cli.trainer.callback_metrics[k]) for k in ("train/loss", "val/loss")]
    assert all(torch.isfinite(torch.tensor(v)) and v > 0 for v in losses), losses
    assert cli.trainer.strategy.root_device.type == "cuda"


def test_export_of_a_gpu_trained_checkpoint_runs_in_onnxruntime(in_tmp, capsys):
    ort = pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime)")
    from swin_lightning.export import main as export_main

    run_cli("fit", *TINY_DEMO, *GPU, "--trainer.precision=bf16-mixed", "--trainer.max_epochs=1")
    ckpt = _last(in_tmp)
    out = in_tmp / "demo.onnx"
    assert export_main(["--ckpt_path", str(ckpt), "--format", "onnx", "--out", str(out)]) == 0
    assert "(ok)" in capsys.readouterr().out
    net = build_network(run_config(ckpt, None), load_checkpoint(ckpt)["state_dict"], None)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = net(x).numpy()
    got = session.run(None, {"images": x.numpy()})[0]
    assert abs(got - want).max() < 1e-4


@pytest.fixture(scope="module")
def jpeg_pack(tmp_path_factory):
    pytest.importorskip("litdata", reason="the packed extra (litdata)")
    from swin_lightning.pack import main as pack_main

    tmp = tmp_path_factory.mktemp("gpu_pack")
    from swin_lightning.bench.gpu_check import write_images

    tree = write_images(tmp / "tree", classes=3, per_class=8, size=48, val_per_class=8)
    out = tmp / "packed"
    assert pack_main(["--root", str(tree), "--out", str(out), "--num_workers", "2"]) == 0
    return out


# nvJPEG and libjpeg-turbo round the IDCT differently, and the resize to the crop follows:
# a few levels of 255 on some pixels, under two on average (torchvision's own GPU decode test
# bounds the mean at 2 on photographs).
JPEG_MAX_LEVELS, JPEG_MEAN_LEVELS = 16, 1.5


def test_device_decode_matches_the_tensor_path_and_fits(jpeg_pack, in_tmp):
    from swin_lightning.data import PackedDataModule

    images = {}
    for decode in ("tensor", "device"):
        dm = PackedDataModule(str(jpeg_pack), image_size=32, batch_size=12, num_workers=0,
                              decode=decode, auto_augment=None)  # fmt: skip
        dm.setup("validate")
        x, _ = next(iter(dm.val_dataloader()))
        if decode == "device":
            x = dm.device_decode(x, torch.device("cuda"), train=False)
        images[decode] = x.to("cuda")
    assert images["device"].device.type == "cuda" and images["device"].dtype == torch.uint8
    diff = (images["device"].float() - images["tensor"].float()).abs()
    assert diff.max() <= JPEG_MAX_LEVELS and diff.mean() <= JPEG_MEAN_LEVELS, (
        float(diff.max()),
        float(diff.mean()),
    )
    cli = run_cli(
        "fit", "--config", str(CONFIGS / "imagefolder.yaml"),
        "--config", str(CONFIGS / "imagenet" / "packed.yaml"), *GPU,
        f"--data.init_args.root={jpeg_pack}", "--data.init_args.image_size=32",
        "--data.init_args.batch_size=8", "--data.init_args.num_workers=0",
        "--data.init_args.decode=device", "--trainer.max_epochs=1",
        "--trainer.precision=bf16-mixed",
    )  # fmt: skip
    assert cli.trainer.global_step == 3  # 24 images, batch 8
    assert torch.isfinite(torch.tensor(float(cli.trainer.callback_metrics["train/loss"])))


def test_ablate_parallel_runs_share_one_gpu(in_tmp):
    from swin_lightning.ablate import main as ablate_main
    from swin_lightning.runs.launchers import visible_gpus

    spec = in_tmp / "spec.yaml"
    spec.write_text(json.dumps({
        "experiment": "gpu_share", "reference": "shift", "seeds": [0],
        "variants": {"shift": [str(CONFIGS / "ablations" / "shift.yaml")],
                     "no_shift": [str(CONFIGS / "ablations" / "no_shift.yaml")]},
    }))  # fmt: skip
    tiny = ["trainer.accelerator=gpu", "trainer.devices=1", "trainer.max_epochs=1",
            "data.init_args.train_size=64", "data.init_args.val_size=32",
            "data.init_args.batch_size=32"]  # fmt: skip
    code = ablate_main(["--config", str(CONFIGS / "ablations" / "window_pairs.yaml"), str(spec),
                        *tiny, "--parallel", "2", "--share_gpus", "--log_dir", "logs"])  # fmt: skip
    assert code == 0
    exp = in_tmp / "logs" / "gpu_share"
    finished = sorted(exp.rglob("finished.json"))
    assert len(finished) == 2
    logs = "\n".join(p.read_text(errors="replace") for p in exp.rglob("fit.log"))
    gpu = visible_gpus()[0]  # an index or a UUID, as this machine lists its GPU
    assert logs.count(f"CUDA_VISIBLE_DEVICES={gpu}") >= 2, logs[-3000:]


def test_ddp_on_one_gpu_passes_the_preflight_broadcast(in_tmp):
    import os
    import subprocess
    import sys

    # A real process group (NCCL), in a fresh process as a user would start it.
    args = [*TINY_DEMO, *GPU, "--trainer.strategy=ddp", "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "swin_lightning", "fit", *args],
                          cwd=in_tmp, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(REPO), os.environ.get("PYTHONPATH", "")])})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "distributed_backend=nccl" in output, output[-2000:]
    assert load_checkpoint(_last(in_tmp))["global_step"] == 4
