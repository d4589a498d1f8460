"""Packed data: pack a generated ImageFolder tree, stream it, resume exactly, decode on tensors."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from swin_lightning.data import ImageFolderDataModule, PackedDataModule
from swin_lightning.data.pack_format import BAD_LIST, META
from swin_lightning.data.packer import iter_labels, pack
from swin_lightning.pack import main as pack_main
from tests.conftest import CONFIGS, REPO, run_cli, write_imagefolder
from tests.test_resume import callback, fit_subprocess

pytest.importorskip("litdata", reason="the packed extra (litdata) is in dev; CI installs it")

CLASSES = ("cat", "dog", "ship")


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A 3-class JPEG tree (8 train, 4 val images per class, one damaged file) and its pack."""
    tmp = tmp_path_factory.mktemp("packed")
    tree = write_imagefolder(tmp / "tree", classes=CLASSES, per_class=8, size=48, fmt="jpg")
    for cls in CLASSES:  # 4 val images per class
        for i in range(4, 8):
            (tree / "val" / cls / f"{i}.jpg").unlink()
    (tree / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    out = tmp / "packed"
    assert pack_main(["--root", str(tree), "--out", str(out), "--num_workers", "2",
                      "--chunk_bytes", "8KB"]) == 0  # fmt: skip
    return tree, out


def test_pack_counts_per_class_and_lists_bad_images(packed):
    _, out = packed
    meta = json.loads((out / META).read_text())
    assert meta["classes"] == sorted(CLASSES)
    assert meta["splits"]["train"]["per_class"] == {"cat": 8, "dog": 8, "ship": 8}
    assert meta["splits"]["val"]["per_class"] == {"cat": 4, "dog": 4, "ship": 4}
    assert meta["splits"]["train"]["bad_images"] == 1
    assert (out / BAD_LIST).read_text().strip().endswith("train/dog/broken.jpg")
    # Every readable file is packed exactly once, with its own label, in a shuffled order.
    stored = list(iter_labels(out / "train"))
    paths = [p for _, p in stored]
    assert sorted(paths) == sorted(f"{c}/{i}.jpg" for c in CLASSES for i in range(8))
    assert all(p.startswith(sorted(CLASSES)[label]) for label, p in stored)
    assert paths != sorted(paths)
    # Opening a split reads its index only: more chunks than one, no file per image.
    assert len(list((out / "train").glob("chunk-*.bin"))) > 1
    assert not list((out / "train").rglob("*.jpg"))


def test_pack_again_is_a_no_op_and_another_tree_is_refused(packed, tmp_path, capsys):
    tree, out = packed
    before = (out / META).read_text()
    assert pack_main(["--root", str(tree), "--out", str(out)]) == 0
    assert (out / META).read_text() == before
    other = write_imagefolder(tmp_path / "other", per_class=1, fmt="jpg")
    assert pack_main(["--root", str(other), "--out", str(out)]) == 1
    assert "error:" in capsys.readouterr().err and (out / META).read_text() == before
    # Same tree, other settings: not reported as done with the old pack's contents.
    for changed in (["--seed", "1"], ["--splits", "train"]):
        assert pack_main(["--root", str(tree), "--out", str(out), *changed]) == 1
        assert "not the one asked for" in capsys.readouterr().err


@pytest.mark.slow
def test_pack_killed_midway_resumes_and_packs_each_image_once(tmp_path, capfd):
    tree = write_imagefolder(tmp_path / "tree", classes=CLASSES, per_class=300, size=96,
                             fmt="jpg")  # fmt: skip
    shutil.rmtree(tree / "val")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "swin_lightning", "pack", "--root", str(tree), "--out",
           str(out), "--num_workers", "2", "--chunk_bytes", "64KB"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    # Killed once a worker has recorded a written chunk in its litdata checkpoint (a chunk
    # file alone is not enough: under load the kill once fell between the two).
    checkpoints = out / "train" / ".checkpoints"
    while not list(checkpoints.glob("checkpoint-*.json")) and proc.poll() is None:
        assert time.monotonic() < deadline, "pack saved no checkpoint in 2 minutes"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the command and its packing workers, mid-write
    proc.wait()
    assert not (out / META).exists(), "pack finished before it was killed: nothing tested"
    # The tree changed since: resuming would mix two trees, so it is refused.
    extra = tree / "train" / "cat" / "late.jpg"
    shutil.copy(tree / "train" / "cat" / "0.jpg", extra)
    assert pack_main(["--root", str(tree), "--out", str(out), "--splits", "train"]) == 1
    assert "changed since" in capfd.readouterr().err
    extra.unlink()
    # Same tree: resumed (with the workers it had, not the default 4), each image once.
    assert pack_main(["--root", str(tree), "--out", str(out), "--splits", "train"]) == 0
    printed = capfd.readouterr().out
    assert "Checkpoints loaded successfully" in printed and "Create an account" not in printed
    paths = [p for _, p in iter_labels(out / "train")]
    assert sorted(paths) == sorted(f"{c}/{i}.jpg" for c in CLASSES for i in range(300))
    meta = json.loads((out / META).read_text())
    assert meta["splits"]["train"]["per_class"] == dict.fromkeys(sorted(CLASSES), 300)


def test_a_pack_cut_by_a_full_disk_is_one_line_and_the_rerun_packs_each_image_once(
    tmp_path, tiny_fs, capfd
):
    tree = write_imagefolder(tmp_path / "tree", classes=("a", "b"), per_class=40, size=48)
    disk = tiny_fs(0.9)  # a real tmpfs: the train split (0.6 MiB packed) fits, val does not
    out = disk / "out"
    args = ["--root", str(tree), "--out", str(out), "--num_workers", "1", "--chunk_bytes", "64KB"]
    assert pack_main(args) == 1
    err = capfd.readouterr().err
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert f"the disk of {out} filled up while packing {tree / 'val'}" in errors[0]
    assert "run the same pack command again" in errors[0]
    assert (out / "train" / "index.json").is_file() and not (out / "val").exists()
    # Space freed: the packed split is checked and kept, val is packed anew, each image once
    # (before: litdata's checkpoint counted items whose chunk was never written: 162 of 160).
    subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
    assert pack_main(args) == 0
    for split in ("train", "val"):
        paths = sorted(p for _, p in iter_labels(out / split))
        assert paths == sorted(f"{c}/{i}.png" for c in ("a", "b") for i in range(40))
    assert not list(out.glob(".bad_*")) and not list(out.glob(".pack_*.log"))


def test_pack_without_splits_is_one_error_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert pack_main(["--root", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "train, val" in err


def test_unfinished_pack_is_refused_by_the_data_module(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a finished pack"):
        PackedDataModule(str(tmp_path), image_size=32)


def _module(out, **kwargs):
    # Whole image, no flip: the pixels identify each sample.
    args = {"image_size": 32, "batch_size": 4, "num_workers": 0, "auto_augment": None,
            "re_prob": 0.0, "shuffle_seed": 3, "scale": (1.0, 1.0), "ratio": (1.0, 1.0),
            "hflip": 0.0}  # fmt: skip
    return PackedDataModule(str(out), **{**args, **kwargs})


def _paths_of(loader, count=None):
    """Labels and a few pixels identify the images a loader yields."""
    seen = []
    for i, (x, y) in enumerate(loader):
        seen += [
            (int(label), tuple(img[:, 0, :4].flatten().tolist()))
            for img, label in zip(x, y, strict=True)
        ]
        if count is not None and i + 1 == count:
            break
    return seen


@pytest.mark.parametrize("decode", ["tensor", "pil", "device"])
def test_packed_module_yields_batches(packed, decode):
    _, out = packed
    dm = _module(out, decode=decode)
    assert dm.num_classes == 3 and dm.classes == sorted(CLASSES)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    if decode == "device":  # still encoded: decoded together before the copy to the device
        assert isinstance(x, list) and all(b.dtype == torch.uint8 and b.dim() == 1 for b in x)
        x, y = dm.on_before_batch_transfer([x, y], 0)
    # The tensor path's workers hand over uint8 crops; the device finishes them.
    assert x.dtype == (torch.float32 if decode == "pil" else torch.uint8)
    x = dm.finish_images(x, train=True)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (4,)
    xv, _ = next(iter(dm.val_dataloader()))
    if decode == "device":
        xv = dm.on_before_batch_transfer([xv, None], 0)[0]
    xv = dm.finish_images(xv, train=False)
    assert xv.shape == (4, 3, 32, 32) and xv.dtype == torch.float32


def test_device_decode_gives_the_tensor_paths_pixels_and_refuses_timm_only_policies(packed):
    # Evaluation is deterministic: decoding a batch together (on the CPU here, nvJPEG on a
    # GPU) and resizing there gives the worker-side tensor path's images.
    _, out = packed
    images = {}
    for decode in ("tensor", "device"):
        dm = _module(out, decode=decode)
        dm.setup("validate")
        x, _ = next(iter(dm.val_dataloader()))
        if decode == "device":
            x = dm.on_before_batch_transfer([x, None], 0)[0]
        images[decode] = dm.finish_images(x, train=False)
    torch.testing.assert_close(images["device"], images["tensor"])
    dm = _module(out, decode="device", auto_augment="rand-m7-n3-mstd0.5")
    augment = dm.device_decode.train.transforms[-1]
    assert (augment.num_ops, augment.magnitude) == (3, 7)
    with pytest.raises(ValueError, match=r"data\.auto_augment='augmix-m5-w3'.*decode=device"):
        _module(out, decode="device", auto_augment="augmix-m5-w3")
    with pytest.raises(ValueError, match=r"data\.decode='device' is not one of pil, tensor$"):
        ImageFolderDataModule(str(out), decode="device")


@pytest.mark.parametrize("workers_after", [0, 2])
def test_resume_mid_epoch_sees_each_sample_once(packed, workers_after):
    # Kill after 2 of 6 batches: the loader's state (what goes into the checkpoint) restores
    # the rest of the epoch, also with another number of workers: no repeats, no gaps.
    _, out = packed
    full = _module(out)
    full.setup("fit")
    epoch = _paths_of(full.train_dataloader())
    assert len(epoch) == 24
    first = _module(out, num_workers=1)
    first.setup("fit")
    loader = first.train_dataloader()
    before = _paths_of(loader, count=2)
    state = loader.state_dict()
    torch.save(state, out.parent / "state.pt")
    state = torch.load(out.parent / "state.pt", weights_only=True)  # checkpoints load so
    second = _module(out, num_workers=workers_after)
    second.setup("fit")
    resumed = second.train_dataloader()
    resumed.load_state_dict(state)
    after = _paths_of(resumed)
    assert len(before) == 8 and len(before) + len(after) == 24
    assert sorted(before + after) == sorted(epoch)


def test_remote_root_reads_through_the_cache(packed, tmp_path):
    # 'local:' takes litdata's remote path (download into the cache) on a local folder.
    _, out = packed
    dm = _module(out, cache_dir=str(tmp_path / "cache"))
    dm.uri = f"local:{out}"
    dm.setup("fit")
    assert len(_paths_of(dm.train_dataloader())) == 24
    assert list((tmp_path / "cache").rglob("chunk-*.bin"))


def packed_fit_args(out) -> list[str]:
    return [
        "--config", str(CONFIGS / "imagefolder.yaml"),
        "--config", str(CONFIGS / "imagenet" / "packed.yaml"),
        f"--data.init_args.root={out}", "--data.init_args.image_size=32",
        "--data.init_args.batch_size=8", "--data.init_args.num_workers=0",
        "--data.init_args.auto_augment=null", "--data.init_args.re_prob=0",
        "--data.init_args.scale=[1.0, 1.0]", "--data.init_args.ratio=[1.0, 1.0]",
        "--data.init_args.hflip=0", "--trainer.limit_val_batches=1",
    ]  # fmt: skip


class RecordImages(L.Callback):
    """Test helper: a fingerprint of every training image, by the step it is trained at."""

    def __init__(self):
        self.images: dict[int, list[float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.images[trainer.global_step] = batch[0].flatten(1).sum(1).round(decimals=3).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("decode", ["tensor", "device"])
def test_fit_on_packed_data(packed, in_tmp, decode):
    _, out = packed
    run_cli("fit", *packed_fit_args(out), "--trainer.max_epochs=1",
            f"--data.init_args.decode={decode}", "--data.init_args.re_prob=0.5")  # fmt: skip
    ckpts = list(in_tmp.rglob("last.ckpt"))
    assert ckpts, "the run saved no checkpoint"
    checkpoint = torch.load(ckpts[0], weights_only=True, map_location="cpu")
    assert checkpoint["global_step"] == 3  # 24 images, batch 8


def _one_image_tree(tree: Path, image: Path) -> Path:
    """An ImageFolder tree of one class holding ``image`` in train and val."""
    for split in ("train", "val"):
        (tree / split / "a").mkdir(parents=True)
        (tree / split / "a" / image.name).write_bytes(image.read_bytes())
    return tree


def test_tensor_and_pil_paths_draw_the_same_augmentations(tmp_path):
    # One image with a bright left half: the mean brightness and its spread over many random
    # crops and flips depend on the crop-scale, aspect and flip distributions.
    pixels = np.zeros((64, 96, 3), dtype=np.uint8)
    pixels[:, :48] = 255
    path = tmp_path / "img.jpg"
    Image.fromarray(pixels).save(path, quality=95)
    stats = {}
    for decode in ("pil", "tensor"):
        tree = _one_image_tree(tmp_path / decode, path)
        dm = ImageFolderDataModule(str(tree), image_size=32, decode=decode, auto_augment=None,
                                   color_jitter=None, re_prob=0.0, mean=(0, 0, 0),
                                   std=(1, 1, 1), num_workers=0)  # fmt: skip
        dm.setup("fit")
        torch.manual_seed(0)
        draws = dm.finish_images(torch.stack([dm.train_set[0][0] for _ in range(400)]), True)
        left = draws[..., :16].mean(dim=(1, 2, 3))  # left half of the crop: flips move it
        stats[decode] = (draws.mean().item(), draws.mean(dim=(1, 2, 3)).std().item(),
                         left.mean().item())  # fmt: skip
    for pil, tensor in zip(stats["pil"], stats["tensor"], strict=True):
        assert tensor == pytest.approx(pil, abs=0.05), stats


def test_tensor_path_erases_on_the_device_as_timm_does_in_workers(tmp_path):
    # A white image, mean 0 / std 1, 'const' erasing: erased pixels are the zeros. The erased
    # share per image follows timm's area distribution on both paths; never in evaluation.
    path = tmp_path / "img.png"
    Image.fromarray(np.full((32, 32, 3), 255, dtype=np.uint8)).save(path)
    shares = {}
    for decode in ("pil", "tensor"):
        tree = _one_image_tree(tmp_path / decode, path)
        dm = ImageFolderDataModule(str(tree), image_size=32, decode=decode, auto_augment=None,
                                   color_jitter=None, re_prob=0.5, re_mode="const",
                                   mean=(0, 0, 0), std=(1, 1, 1), num_workers=0)  # fmt: skip
        dm.setup("fit")
        random.seed(0)
        torch.manual_seed(0)
        batch = dm.finish_images(torch.stack([dm.train_set[0][0] for _ in range(600)]), True)
        shares[decode] = (batch == 0).all(dim=1).float().mean(dim=(1, 2))
        evaluated = dm.finish_images(torch.stack([dm.val_set[0][0]] * 4), False)
        assert (evaluated == 1).all()
    for decode, share in shares.items():
        erased = share[share > 0]
        assert 0.35 < len(erased) / len(share) < 0.65, decode  # re_prob
        assert erased.min() >= 0.015 and erased.max() <= 0.36, decode  # 2%-33%, rounded sides
    assert shares["tensor"].mean().item() == pytest.approx(shares["pil"].mean().item(), abs=0.02)


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "augmix-m5-w3", "original"])
def test_tensor_path_runs_the_full_recipe_with_timms_policies(tmp_path, policy):
    # timm's auto-augment ops on tensor crops, then random erasing, many draws each.
    root = write_imagefolder(tmp_path, per_class=1, size=64, fmt="jpg")
    dm = ImageFolderDataModule(str(root), image_size=32, decode="tensor", num_workers=0,
                               auto_augment=policy)  # fmt: skip
    dm.setup("fit")
    torch.manual_seed(0)
    draws = dm.finish_images(torch.stack([dm.train_set[0][0] for _ in range(50)]), True)
    assert draws.shape == (50, 3, 32, 32) and torch.isfinite(draws).all()
    assert draws.std(dim=0).mean() > 0.1  # the augmentation changes the image


def test_unknown_decode_is_refused(tmp_path):
    root = write_imagefolder(tmp_path, per_class=1)
    with pytest.raises(ValueError, match=r"data\.decode"):
        ImageFolderDataModule(str(root), decode="cv2")


@pytest.mark.slow
def test_killed_fit_on_packed_data_resumes_on_the_next_sample(packed, in_tmp):
    # 2 epochs of 3 steps; killed after step 5 (mid-epoch 2), last.ckpt of step 4 survives.
    _, out = packed
    args = [*packed_fit_args(out), "--trainer.max_epochs=2",
            "--step_checkpoint.every_n_train_steps=1"]  # fmt: skip
    record = "--trainer.callbacks+=tests.test_packed.RecordImages"
    reference = run_cli("fit", *args, record, "--trainer.logger.init_args.save_dir=ref")
    want = next(c for c in reference.trainer.callbacks if isinstance(c, RecordImages)).images
    assert sorted(want) == list(range(6))
    assert len({v for s in (0, 1, 2) for v in want[s]}) == 24  # one epoch: every image once
    killed = fit_subprocess(*args, callback("KillAt", step=5), cwd=in_tmp)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = in_tmp / "logs" / "imagefolder" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 4 and state["epoch"] == 1
    assert "train_loader" in state["callbacks"]["ResumeState"]
    resumed = run_cli("fit", *args, record, "--ckpt_path=last")
    got = next(c for c in resumed.trainer.callbacks if isinstance(c, RecordImages)).images
    assert got == {s: v for s, v in want.items() if s >= 4}


def _rank_samples(rank: int, world: int, out: str, init: str, result: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        dm = _module(out)
        dm.setup("fit")
        seen = [image for _, image in _paths_of(dm.train_dataloader())]
        Path(f"{result}.{rank}").write_text(json.dumps(seen))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_stream_disjoint_shards(packed, tmp_path):
    # Two CPU processes (gloo), as DDP runs them: each rank streams its own part of the epoch.
    _, out = packed
    result = tmp_path / "seen"
    init = f"file://{tmp_path / 'rendezvous'}"
    torch.multiprocessing.spawn(_rank_samples, args=(2, str(out), init, str(result)), nprocs=2)
    ranks = [{tuple(x) for x in json.loads(Path(f"{result}.{r}").read_text())} for r in (0, 1)]
    assert all(len(r) == 12 for r in ranks)  # 24 images, 12 a rank
    assert not ranks[0] & ranks[1]


def test_opening_a_pack_stats_no_file_per_sample(packed, monkeypatch):
    # Opening reads meta.json and each split's index.json: the number of file-system look-ups
    # does not grow with the number of samples (a loose-file tree stats every image).
    _, out = packed
    calls = []
    real_stat = os.stat

    def counting_stat(path, *args, **kwargs):
        calls.append(str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)
    dm = _module(out)
    dm.setup("fit")
    assert len(dm.train_set) == 24 and len(dm.val_set) == 12
    per_image = [c for c in calls if c.endswith(".jpg")]
    assert not per_image
    assert 0 < len(calls) < 24, calls  # the index and meta files are looked up


def test_samples_imagefolder_tree_packs(tmp_path):
    # docs/packed_data.md's offline walk-through: embedded shapes as a tree, packed, read.
    from swin_lightning.samples import main as samples

    samples([str(tmp_path / "tree"), "--imagefolder", "--count", "50"])
    n_train = len(list((tmp_path / "tree" / "train").rglob("*.png")))
    n_val = len(list((tmp_path / "tree" / "val").rglob("*.png")))
    assert n_train + n_val == 50 and 10 <= n_val < 20  # every class has val images
    meta = pack(tmp_path / "tree", tmp_path / "packed", num_workers=1)
    assert meta["splits"]["train"]["samples"] == n_train and len(meta["classes"]) == 10
    dm = _module(tmp_path / "packed")
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.max() < 10


def test_pack_refuses_splits_with_different_classes_before_packing(tmp_path, capsys):
    tree = write_imagefolder(tmp_path / "tree", per_class=1, fmt="jpg")
    (tree / "val" / "ship" / "0.jpg").unlink()
    (tree / "val" / "ship").rmdir()
    assert pack_main(["--root", str(tree), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "only in train: ['ship']" in err and not (tmp_path / "out").exists()
