"""Table 4: input pipeline throughput of the ImageFolder train loader."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


def bench_input_pipeline(num_images: int, workers: list[int]) -> list[dict]:
    """Images/s of the ImageFolder training loader (timm augmentation at 224)."""
    import numpy as np
    from PIL import Image

    from swin_lightning.data import ImageFolderDataModule

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for split in ("train", "val"):
            for cls in ("a", "b"):
                folder = Path(tmp) / split / cls
                folder.mkdir(parents=True)
                for i in range(num_images // 2 if split == "train" else 1):
                    pixels = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)  # ImageNet-like
                    Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
        for n in workers:
            dm = ImageFolderDataModule(tmp, image_size=224, batch_size=16, num_workers=n)
            dm.setup("fit")
            loader = dm.train_dataloader()
            for _ in loader:  # warm-up pass (worker start, file cache)
                pass
            start = time.perf_counter()
            seen = sum(len(b[0]) for b in loader)
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "workers": n,
                    "img_s": seen / seconds,
                    "img_s_per_worker": seen / seconds / max(n, 1),
                }
            )
    return rows
