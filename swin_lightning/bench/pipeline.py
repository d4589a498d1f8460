"""Table 4: input pipeline throughput of the train loaders: loose JPEGs (ImageFolder) or
packed chunks (litdata), decoded by PIL (timm's transforms) or to tensors (transforms v2)."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

PIPELINES = (
    ("ImageFolder", "pil"),
    ("ImageFolder", "tensor"),
    ("packed", "pil"),
    ("packed", "tensor"),
)


def write_jpeg_tree(root: Path, num_images: int) -> None:
    """``root/{train,val}/{a,b}/*.jpg``: 500x375 JPEGs of smooth random content, about the
    size of an average ImageNet file (pure noise would be 3-4x larger and slower to decode)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(num_images // 2 if split == "train" else 1):
                coarse = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
                image = Image.fromarray(coarse).resize((500, 375), Image.BICUBIC)
                grain = rng.integers(-12, 13, (375, 500, 3))
                pixels = np.clip(np.asarray(image, dtype=np.int16) + grain, 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)


def timed_pass(loader, finish) -> tuple[float, float]:
    """One pass over ``loader``, each batch finished by ``finish`` (the data module's
    on-device steps, here on the CPU): seconds to its first batch (worker start-up included)
    and images/s after it, the rate an epoch of a real dataset runs at."""
    start = time.perf_counter()
    first_at, first_len, seen = None, 0, 0
    for batch in loader:
        seen += len(finish(batch[0], True))
        if first_at is None:
            first_at, first_len = time.perf_counter(), seen
    end = time.perf_counter()
    if first_at is None or seen == first_len:
        raise ValueError("the loader gave fewer than two batches: too few images to time")
    return first_at - start, (seen - first_len) / (end - first_at)


def bench_input_pipeline(
    num_images: int, workers: list[int], rounds: int = 3, warmup: int = 1
) -> list[dict]:
    """Images/s of each training loader of :data:`PIPELINES` (RandAugment m9 + random erasing,
    224 crops) after its first batch, and the seconds to that batch (workers start afresh
    every epoch), per number of workers; loaders alternate over ``rounds`` passes (medians)
    after ``warmup`` untimed passes each.
    The packed rows need litdata (the ``packed`` extra) and are left out without it."""
    import torch

    from swin_lightning.data import ImageFolderDataModule

    try:
        import litdata  # noqa: F401

        from swin_lightning.data.packed import PackedDataModule
        from swin_lightning.data.packer import pack
    except ImportError:
        pack = None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tree, packed = Path(tmp) / "tree", Path(tmp) / "packed"
        write_jpeg_tree(tree, num_images)
        pipelines = [p for p in PIPELINES if p[0] != "packed" or pack is not None]
        if pack is not None:
            pack(tree, packed, num_workers=1, chunk_bytes="16MB")
        mean_kb = statistics.mean(p.stat().st_size for p in tree.rglob("*.jpg")) / 1024
        for n in workers:
            loaders = {}
            for source, decode in pipelines:
                kwargs = {"image_size": 224, "batch_size": 16, "num_workers": n, "decode": decode}
                if source == "packed":
                    dm = PackedDataModule(str(packed), **kwargs)
                else:
                    dm = ImageFolderDataModule(str(tree), **kwargs)
                dm.setup("fit")
                loaders[(source, decode)] = (dm.train_dataloader(), dm.finish_images)
            # A loader worker runs torch on one thread (DataLoader sets it); so does the
            # main-process row, so that every row is comparable per process.
            threads = torch.get_num_threads()
            torch.set_num_threads(1 if n == 0 else threads)
            rates: dict[tuple[str, str], list[float]] = {key: [] for key in loaders}
            starts: dict[tuple[str, str], list[float]] = {key: [] for key in loaders}
            for _ in range(warmup):  # worker start, file cache
                for loader, _ in loaders.values():
                    for _ in loader:
                        pass
            for r in range(rounds):
                for key in list(loaders) if r % 2 == 0 else reversed(list(loaders)):
                    start_s, img_s = timed_pass(*loaders[key])
                    starts[key].append(start_s)
                    rates[key].append(img_s)
            torch.set_num_threads(threads)
            base = statistics.median(rates[("ImageFolder", "pil")])
            for (source, decode), values in rates.items():
                img_s = statistics.median(values)
                rows.append(
                    {
                        "source": source,
                        "decode": decode,
                        "workers": n,
                        "first_batch_s": statistics.median(starts[(source, decode)]),
                        "img_s": img_s,
                        "img_s_per_worker": img_s / max(n, 1),
                        "vs_imagefolder_pil": img_s / base,
                        "mean_jpeg_kb": mean_kb,
                    }
                )
    return rows
