"""An embedded dataset: procedurally drawn shapes, no download and no files.

Every image is drawn from a seeded generator, so a given (seed, split, size) always yields
the same tensors. Each class is one shape or texture, drawn at a random position and size in a
random bright colour over a random dark background, with Gaussian noise: easy enough that a small Swin
learns it on a CPU in a couple of minutes, hard enough that chance (1/num_classes) is far.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import TensorDataset
from torchvision import transforms as T

from swin_lightning.data.base import ClassificationDataModule

SHAPES = (
    "disk",
    "ring",
    "square",
    "frame",
    "cross",
    "triangle",
    "horizontal_stripes",
    "vertical_stripes",
    "checkerboard",
    "diagonal_stripes",
)
_SPLIT_OFFSET = {"train": 0, "val": 1_000_003, "test": 2_000_003}


def _shape_mask(cls: int, dy: torch.Tensor, dx: torch.Tensor, r: float, period: int):
    """Boolean mask of shape ``cls`` centred at the origin of the offsets (dy, dx)."""
    box = torch.maximum(dy.abs(), dx.abs())
    dist = torch.sqrt(dy**2 + dx**2)
    inside = box < r
    stripes = torch.div(dy + 64, period, rounding_mode="floor") % 2 == 0
    vstripes = torch.div(dx + 64, period, rounding_mode="floor") % 2 == 0
    name = SHAPES[cls]
    if name == "disk":
        return dist < r
    if name == "ring":
        return (dist < r) & (dist > 0.55 * r)
    if name == "square":
        return box < 0.8 * r
    if name == "frame":
        return inside & (box > 0.55 * r)
    if name == "cross":
        return ((dy.abs() < 0.3 * r) & (dx.abs() < r)) | ((dx.abs() < 0.3 * r) & (dy.abs() < r))
    if name == "triangle":
        return (dy < 0.8 * r) & (dx.abs() < (dy + r) / 2)
    if name == "horizontal_stripes":
        return inside & stripes
    if name == "vertical_stripes":
        return inside & vstripes
    if name == "checkerboard":
        return inside & (stripes ^ vstripes)
    diag = torch.div(dy + dx + 128, period, rounding_mode="floor") % 2 == 0
    return inside & diag


def draw_shapes(
    n: int, num_classes: int, image_size: int, seed: int, noise: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``(n, 3, S, S)`` in [0, 1] and their labels, fully determined by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    S = image_size
    ys, xs = torch.meshgrid(
        torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32), indexing="ij"
    )
    images = torch.empty(n, 3, S, S)
    u = torch.rand(n, 4, generator=g)
    colours = torch.rand(n, 2, 3, generator=g)
    periods = torch.randint(2, max(3, S // 8) + 1, (n,), generator=g)
    for i in range(n):
        r = S * (0.18 + 0.14 * u[i, 0].item())
        cy = r + (S - 2 * r) * u[i, 1].item()
        cx = r + (S - 2 * r) * u[i, 2].item()
        mask = _shape_mask(int(labels[i]), ys - cy, xs - cx, r, int(periods[i])).float()
        # a bright shape on a dark background, each in a random colour
        fg, bg = 0.6 + 0.4 * colours[i, 0], 0.4 * colours[i, 1]
        images[i] = bg[:, None, None] * (1 - mask) + fg[:, None, None] * mask
    images += noise * torch.randn(images.shape, generator=g)
    return images.clamp_(0.0, 1.0), labels


class EmbeddedShapesDataModule(ClassificationDataModule):
    """Procedurally generated shapes: needs no download and no files (the demo's dataset).

    Args:
        num_classes: How many of the 10 shape classes to use (2..10).
        train_size: Training images.
        val_size: Validation images.
        test_size: Test images.
        image_size: Side of the square images.
        noise: Standard deviation of the Gaussian pixel noise.
        seed: Seed of the generator; the same seed always gives the same images.
        batch_size: Images per device and step.
        num_workers: Data-loading worker processes (0 is fastest: data is in memory).
        pin_memory: Pin host memory for faster copies to the GPU.
        predict_dir: Folder of images for ``predict``.
    """

    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    interpolation = "bilinear"  # eval_transform's resize (torchvision's default)

    def __init__(
        self,
        num_classes: int = 10,
        train_size: int = 4000,
        val_size: int = 1000,
        test_size: int = 1000,
        image_size: int = 32,
        noise: float = 0.1,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        predict_dir: str | None = None,
    ):
        super().__init__(batch_size, num_workers, pin_memory, predict_dir)
        if not 2 <= num_classes <= len(SHAPES):
            raise ValueError(f"data.num_classes={num_classes} must be in [2, {len(SHAPES)}]")
        if image_size < 8:
            raise ValueError(f"data.image_size={image_size} must be >= 8")
        for name, size in (
            ("train_size", train_size),
            ("val_size", val_size),
            ("test_size", test_size),
        ):
            if size < 1:
                raise ValueError(f"data.{name}={size} must be >= 1")
        self.num_classes = num_classes
        self.classes = list(SHAPES[:num_classes])
        self.image_size = image_size
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.noise = noise
        self.seed = seed
        self.normalize = T.Normalize(self.mean, self.std)

    def make_split(self, split: str) -> TensorDataset:
        images, labels = draw_shapes(
            self.sizes[split],
            self.num_classes,
            self.image_size,
            self.seed + _SPLIT_OFFSET[split],
            self.noise,
        )
        return TensorDataset(self.normalize(images), labels)

    def eval_transform(self) -> Callable:
        return T.Compose(
            [T.Resize(self.image_size), T.CenterCrop(self.image_size), T.ToTensor(), self.normalize]
        )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.train_set is None:
            self.train_set = self.make_split("train")
        if stage in ("fit", "validate") and self.val_set is None:
            self.val_set = self.make_split("val")
        if stage == "test" and self.test_set is None:
            self.test_set = self.make_split("test")


# Bar colours of the window-border task: distinct, bright, on a dark noisy background.
PAIR_COLOURS = torch.tensor(
    [[1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.3, 0.4, 1.0], [1.0, 1.0, 0.2], [1.0, 0.3, 1.0]]
)


def draw_border_pairs(
    n: int, image_size: int, seed: int, noise: float, num_colours: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two bars along either side of the image's centre line: label 1 if same colour.

    Each bar is 2 pixels wide, 0-2 pixels from the line, of random length and position. The
    centre line is a window border in every stage of a Swin whose last stage still has more
    than one window, so without shifted windows no token ever sees both bars; the pooled
    features are then a sum f(a) + g(b), on which a linear head cannot tell "same" from
    "different" (the mixed case is the midpoint of the two same-colour cases). A shifted
    window straddles the line and lets the two bars meet.
    """
    g = torch.Generator().manual_seed(seed)
    S, mid = image_size, image_size // 2
    images = 0.25 * torch.rand(n, 3, 1, 1, generator=g).expand(n, 3, S, S).clone()
    labels = torch.arange(n) % 2
    labels = labels[torch.randperm(n, generator=g)]
    first = torch.randint(num_colours, (n,), generator=g)
    other = (first + torch.randint(1, num_colours, (n,), generator=g)) % num_colours
    second = torch.where(labels == 1, first, other)
    vertical = torch.rand(n, generator=g) < 0.5  # bars left/right of the vertical line
    length = torch.randint(S // 4, S + 1, (n,), generator=g)  # bar length along the line
    start = (torch.rand(n, generator=g) * (S - length + 1)).long()
    gap_a = torch.randint(0, 3, (n,), generator=g)  # distance from the line, in pixels
    gap_b = torch.randint(0, 3, (n,), generator=g)
    for i in range(n):
        along = slice(int(start[i]), int(start[i] + length[i]))
        for offset, colour in (
            (mid - 2 - int(gap_a[i]), first[i]),
            (mid + int(gap_b[i]), second[i]),
        ):
            across = slice(offset, offset + 2)
            block = PAIR_COLOURS[colour][:, None, None]
            if vertical[i]:
                images[i, :, along, across] = block
            else:
                images[i, :, across, along] = block
    images += noise * torch.randn(images.shape, generator=g)
    return images.clamp_(0.0, 1.0), labels


class WindowPairsDataModule(EmbeddedShapesDataModule):
    """Embedded task where the label depends on pixels in two neighbouring windows.

    Two bars run along either side of the image's centre line; the label says whether
    they have the same colour (2 classes, balanced). Made for the shift ablation: a Swin
    whose windows never straddle the centre line (no shift, no global stage) is at chance.

    Args:
        train_size: Training images.
        val_size: Validation images.
        test_size: Test images.
        image_size: Side of the square images (even).
        noise: Standard deviation of the Gaussian pixel noise.
        num_colours: Colours the bars are drawn from (2..5).
        seed: Seed of the generator.
        batch_size: Images per device and step.
        num_workers: Data-loading worker processes.
        pin_memory: Pin host memory for faster copies to the GPU.
        predict_dir: Folder of images for ``predict``.
    """

    def __init__(
        self,
        train_size: int = 2000,
        val_size: int = 500,
        test_size: int = 500,
        image_size: int = 32,
        noise: float = 0.05,
        num_colours: int = 4,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        predict_dir: str | None = None,
    ):
        super().__init__(
            2, train_size, val_size, test_size, image_size, noise, seed, batch_size,
            num_workers, pin_memory, predict_dir,
        )  # fmt: skip
        if not 2 <= num_colours <= len(PAIR_COLOURS):
            raise ValueError(f"data.num_colours={num_colours} must be in [2, {len(PAIR_COLOURS)}]")
        if image_size % 2:
            raise ValueError(f"data.image_size={image_size} must be even")
        self.num_colours = num_colours
        self.classes = ["different", "same"]

    def make_split(self, split: str) -> TensorDataset:
        images, labels = draw_border_pairs(
            self.sizes[split], self.image_size, self.seed + _SPLIT_OFFSET[split], self.noise,
            self.num_colours,
        )  # fmt: skip
        return TensorDataset(self.normalize(images), labels)
