"""``verify``: every kind of bad file planted in a generated ImageFolder tree is found."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from swin_lightning.verify import main, verify_tree
from tests.conftest import write_imagefolder


def image(path: Path, mode: str = "RGB", seed: int = 0, fmt: str = "PNG") -> Path:
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 24, 3), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path, fmt)
    return path


def test_a_clean_tree_passes_and_shows_its_balance(tmp_path, capsys):
    root = write_imagefolder(tmp_path / "data")
    assert main(["--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "[verify] clean" in out and "[verify] train:" in out and "classes; smallest" in out


def test_each_kind_of_bad_file_is_found_and_listed_never_deleted(tmp_path, capsys):
    root = tmp_path / "data"
    for n, (split, c, i) in enumerate(
        (s, c, i) for s in ("train", "val") for c in ("cat", "dog") for i in range(2)
    ):
        image(root / split / c / f"{i}.png", seed=n)
    planted = {
        "empty": root / "train" / "cat" / "empty.png",
        "not_image": root / "train" / "cat" / "notes.jpg",
        "truncated": root / "train" / "dog" / "cut.jpg",
        "corrupt": root / "val" / "dog" / "garbage.png",
        "mode": root / "train" / "dog" / "cmyk.jpg",
        "duplicate": root / "val" / "cat" / "copy.png",
        "suffix": root / "val" / "cat" / "readme.txt",
    }
    planted["empty"].write_bytes(b"")
    planted["not_image"].write_text("not a picture")
    full = image(tmp_path / "full.jpg", fmt="JPEG").read_bytes()
    planted["truncated"].write_bytes(full[: len(full) // 2])
    damaged = bytearray(image(tmp_path / "ok.png", seed=5).read_bytes())
    damaged[60:200] = bytes(140)  # inside the pixel data: the header still reads
    planted["corrupt"].write_bytes(bytes(damaged))
    image(planted["mode"], mode="CMYK", fmt="JPEG")
    grey = image(root / "val" / "dog" / "grey.png", mode="L")
    shutil.copy(root / "train" / "cat" / "0.png", planted["duplicate"])
    planted["suffix"].write_text("hello")
    (root / "train" / "emu").mkdir()
    image(root / "train" / "emu" / "0.png", seed=99)  # a class that val does not have
    fix = tmp_path / "bad.txt"
    before = sorted(p for p in root.rglob("*") if p.is_file())
    assert main(["--root", str(root), "--fix_list", str(fix)]) == 1
    out = capsys.readouterr().out
    kinds = {line.split(":")[0]: line for line in out.splitlines() if not line.startswith("[")}
    report = verify_tree(root)
    found = {(p.kind, p.path) for p in report.problems}
    for kind, path in planted.items():
        want = "not_image" if kind == "suffix" else kind
        assert (want, path) in found, (kind, sorted(found))
    assert (("mode", grey) in found and "mode L" in kinds["mode"]) or ("mode", grey) in found
    assert ("missing_class", root / "val" / "emu") in found
    assert len(report.problems) == 9 and len(out.splitlines()) == 2 + 9 + 1
    listed = fix.read_text().splitlines()
    assert set(listed) == {str(p) for p in [*planted.values(), grey]}
    assert sorted(p for p in root.rglob("*") if p.is_file()) == before  # nothing moved


def test_verify_is_a_subcommand_with_one_error_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "swin_lightning", "verify", "--root",
                           str(tmp_path / "nowhere")], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error:") and len(done.stderr.strip().splitlines()) == 1
