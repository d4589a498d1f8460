"""``python -m swin_lightning analyze``: look inside a trained classifier on a split.

    python -m swin_lightning analyze --ckpt_path logs/demo/version_0 [--split val|test]
        [--out DIR] [--k 16] [--cams 2] [--temperature]

The network is the checkpoint's (:func:`swin_lightning.load_model`), the data the run's
``config.yaml``. Written to ``<run>/analysis/<split>/`` (or ``--out``) and to the run's
TensorBoard (tab IMAGES, TEXT and SCALARS under ``analysis/``):

- ``confusion.csv`` / ``confusion.png`` (counts; the picture row-normalised, with class
  names), ``per_class.csv`` (precision, recall = per-class accuracy, support), the most
  confused pairs (torchmetrics);
- ``worst.png`` and ``best.png``: the k most confident mistakes and successes;
- calibration: expected calibration error (15 bins, torchmetrics) and ``reliability.png``;
  with ``--temperature``, a temperature fitted on val (NLL) and the ECE it gives;
- test-time augmentation (``flip``, ``flip_zoom``: :mod:`swin_lightning.tta`) beside the plain
  top-1;
- ``cams.png``: Grad-CAM and attention rollout (:mod:`swin_lightning.cam`) for ``--cams``
  images per class;
- ``analysis.md`` with the tables.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchmetrics.classification import (
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
    MulticlassPrecision,
    MulticlassRecall,
)

from swin_lightning.load import find_checkpoint, load_model
from swin_lightning.run_network import ExportError, datamodule_from_config, run_config
from swin_lightning.storage import CheckpointError, WriteError, atomic_open, save_figure, write_text
from swin_lightning.tta import views

N_BINS = 15


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """ECE over :data:`N_BINS` equal-width confidence bins (torchmetrics, L1)."""
    metric = MulticlassCalibrationError(probs.shape[1], n_bins=N_BINS, norm="l1")
    return float(metric(probs, targets))


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The temperature T minimising the NLL of ``softmax(logits / T)`` (LBFGS on log T)."""
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


@dataclass
class SplitPredictions:
    """Per image of a split: the probabilities of each TTA view, and the labels."""

    logits: torch.Tensor  # plain, (n, classes)
    view_probs: torch.Tensor  # (views, n, classes): plain, flip, zoom, zoom + flip
    targets: torch.Tensor

    def tta(self, mode: str) -> torch.Tensor:
        used = {"none": 1, "flip": 2, "flip_zoom": 4}[mode]
        return self.view_probs[:used].mean(dim=0)


@torch.no_grad()
def predict_split(net: torch.nn.Module, loader, prepare) -> SplitPredictions:
    logits, probs, targets = [], [], []
    for batch in loader:
        images, labels = prepare(batch)
        outs = [net(v) for v in views(images, "flip_zoom")]
        logits.append(outs[0])
        probs.append(torch.stack([o.softmax(-1) for o in outs]))
        targets.append(labels)
    return SplitPredictions(torch.cat(logits), torch.cat(probs, dim=1), torch.cat(targets))


def _datamodule(config: dict[str, Any]):
    """The run's data module, loading in this process (no worker processes)."""
    datamodule = datamodule_from_config(config)
    datamodule.num_workers = 0
    return datamodule


def _loader(datamodule, split: str):
    datamodule.setup("validate" if split == "val" else "test")
    loader = datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()

    def prepare(batch):
        """A loader batch as the model sees it: (images, labels)."""
        images, labels = datamodule.on_before_batch_transfer(batch, 0)[:2]
        return datamodule.finish_images(images, train=False), labels

    return loader, prepare, (datamodule.val_set if split == "val" else datamodule.test_set)


def _samples(dataset, indices: list[int], prepare):
    """Images ``indices`` of ``dataset`` as one prepared batch."""
    from torch.utils.data import default_collate

    return prepare(default_collate([dataset[int(i)] for i in indices]))


def confusion(probs: torch.Tensor, targets: torch.Tensor, classes: int) -> torch.Tensor:
    """Counts ``(true, predicted)`` (torchmetrics)."""
    return MulticlassConfusionMatrix(classes)(probs, targets).long()


def _plots(out: Path, matrix: torch.Tensor, names: list[str], probs, targets) -> None:
    from matplotlib.figure import Figure

    rows = matrix.float() / matrix.sum(1, keepdim=True).clamp_min(1)
    size = max(4.0, 0.45 * len(names) + 2)
    fig = Figure(figsize=(size, size), dpi=110)
    ax = fig.subplots()
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(names) <= 20:
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if rows[i, j] > 0.5 else "black")  # fmt: skip
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    ax.set_title("confusion matrix (rows: true class)")
    fig.tight_layout()
    save_figure(fig, out / "confusion.png")
    conf, pred = probs.max(1)
    correct = (pred == targets).float()
    edges = torch.linspace(0, 1, N_BINS + 1)
    acc, mid = [], []
    for lo, hi in itertools.pairwise(edges):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            acc.append(float(correct[inside].mean()))
            mid.append(float(conf[inside].mean()))
    fig = Figure(figsize=(4.5, 4.5), dpi=110)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.bar(mid, acc, width=1 / N_BINS, edgecolor="black", alpha=0.7, label="accuracy in bin")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability ({N_BINS} bins)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    save_figure(fig, out / "reliability.png")


def _show(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised NCHW images back to [0, 1] NHWC for display."""
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (images * s + m).clamp(0, 1).permute(0, 2, 3, 1)


def _grid(out: Path, name: str, images, titles: list[str], overlays=None, columns=8) -> None:
    from matplotlib.figure import Figure

    n = len(images)
    rows = (n + columns - 1) // columns
    fig = Figure(figsize=(1.6 * columns, 1.8 * rows), dpi=110)
    axes = fig.subplots(rows, columns, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i])
            if overlays is not None:
                ax.imshow(overlays[i], cmap="jet", alpha=0.45, vmin=0, vmax=1)
            ax.set_title(titles[i], fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / name)


def analyze(ckpt_path: str | Path, split: str = "val", out: str | Path | None = None,
            k: int = 16, cams: int = 2, temperature: bool = False) -> Path:  # fmt: skip
    """Write the analysis of a run's checkpoint on ``split``; returns ``analysis.md``."""
    from swin_lightning.cam import attention_rollout, grad_cam

    ckpt = find_checkpoint(ckpt_path)
    run_dir = ckpt.resolve().parent.parent
    model = load_model(ckpt)
    net = model.net
    if not getattr(net, "num_classes", 0):
        raise CheckpointError(f"{ckpt} is a SimMIM encoder (no classes): analyze a classifier")
    config = run_config(ckpt, None)
    datamodule = _datamodule(config)
    names = model.classes or [str(c) for c in datamodule.classes]
    loader, prepare, dataset = _loader(datamodule, split)
    preds = predict_split(net, loader, prepare)
    n_classes = preds.logits.shape[1]
    out = Path(out) if out else run_dir / "analysis" / split
    out.mkdir(parents=True, exist_ok=True)
    probs, targets = preds.tta("none"), preds.targets
    matrix = confusion(probs, targets, n_classes)
    precision = MulticlassPrecision(n_classes, average=None, zero_division=0)(probs, targets)
    recall = MulticlassRecall(n_classes, average=None, zero_division=0)(probs, targets)
    with atomic_open(out / "confusion.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *names])
        writer.writerows([names[i], *matrix[i].tolist()] for i in range(n_classes))
    with atomic_open(out / "per_class.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "precision", "recall", "support"])
        writer.writerows([names[i], f"{float(precision[i]):.4f}", f"{float(recall[i]):.4f}",
                          int(matrix[i].sum())] for i in range(n_classes))  # fmt: skip
    _plots(out, matrix, names, probs, targets)
    # The most confident mistakes and successes.
    conf, pred = probs.max(1)
    wrong = (pred != targets).nonzero()[:, 0]
    right = (pred == targets).nonzero()[:, 0]
    picked = {}
    for label, idx in (("worst", wrong), ("best", right)):
        order = idx[conf[idx].argsort(descending=True)][:k]
        picked[label] = order
        if len(order):
            batch, _ = _samples(dataset, order.tolist(), prepare)
            shown = _show(batch, model.data_config["mean"], model.data_config["std"])
            titles = [f"{names[int(targets[i])]} -> {names[int(pred[i])]}\n{float(conf[i]):.2f}"
                      for i in order]  # fmt: skip
            _grid(out, f"{label}.png", shown, titles)
    # Class-activation maps: the first --cams images of each class.
    chosen = [int(i) for c in range(n_classes) for i in (targets == c).nonzero()[:cams, 0]]
    if chosen:
        batch, _ = _samples(dataset, chosen, prepare)
        shown = _show(batch, model.data_config["mean"], model.data_config["std"])
        cam = grad_cam(net, batch, [int(pred[i]) for i in chosen])
        attention = all(b.mixer == "attention" for stage in net.layers for b in stage.blocks)
        roll = attention_rollout(net, batch) if attention else cam  # an MLP mixer: no rollout
        images = [im for pair in zip(shown, shown, strict=True) for im in pair]
        overlays = [m for pair in zip(cam, roll, strict=True) for m in pair]
        second = "rollout" if attention else "Grad-CAM (MLP: no rollout)"
        titles = [t for i in chosen for t in (f"{names[int(targets[i])]}: Grad-CAM",
                                               f"{second} ({names[int(pred[i])]})")]  # fmt: skip
        _grid(out, "cams.png", images, titles, overlays)
    # Calibration and test-time augmentation.
    ece = expected_calibration_error(probs, targets)
    lines = [f"# Analysis: {run_dir.name}, {split} split ({len(targets)} images)", ""]
    lines += ["| setting | top-1 (%) | ECE (%) |", "|---|---|---|"]
    for mode in ("none", "flip", "flip_zoom"):
        p = preds.tta(mode)
        top1 = 100 * float((p.argmax(1) == targets).float().mean())
        label = "plain" if mode == "none" else f"TTA {mode}"
        lines.append(
            f"| {label} | {top1:.2f} | {100 * expected_calibration_error(p, targets):.2f} |"
        )
    if temperature:
        if split == "val":
            fit_logits, fit_targets = preds.logits, targets
        else:
            val_loader, val_prepare, _ = _loader(_datamodule(config), "val")
            val = predict_split(net, val_loader, val_prepare)
            fit_logits, fit_targets = val.logits, val.targets
        t = fit_temperature(fit_logits, fit_targets)
        scaled = expected_calibration_error((preds.logits / t).softmax(-1), targets)
        lines.append(f"| plain, temperature {t:.3f} (fitted on val) | "
                     f"{100 * float((preds.logits.argmax(1) == targets).float().mean()):.2f} | "
                     f"{100 * scaled:.2f} |")  # fmt: skip
    lines += ["", "## Per class", "", "| class | precision | recall (accuracy) | support |",
              "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {names[i]} | {100 * float(precision[i]):.1f} | {100 * float(recall[i]):.1f} | "
              f"{int(matrix[i].sum())} |" for i in range(n_classes)]  # fmt: skip
    off = matrix.clone()
    off.fill_diagonal_(0)
    pairs = [(int(off[i, j]), names[i], names[j]) for i in range(n_classes)
             for j in range(n_classes) if off[i, j] > 0]  # fmt: skip
    lines += ["", "## Most confused (true -> predicted: images)", ""]
    lines += [f"- {a} -> {b}: {n}" for n, a, b in sorted(pairs, reverse=True)[:10]] or ["- none"]
    lines += ["", "![confusion](confusion.png) ![reliability](reliability.png)", "",
              "![worst](worst.png)", "", "![best](best.png)", "", "![cams](cams.png)", ""]  # fmt: skip
    text = "\n".join(lines)
    write_text(out / "analysis.md", text)
    _to_tensorboard(run_dir, out, split, text, ece, preds)
    return out / "analysis.md"


def _to_tensorboard(run_dir: Path, out: Path, split: str, text: str, ece: float, preds) -> None:
    import numpy as np
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run_dir)) as writer:
        writer.add_text(f"analysis/{split}", text)
        writer.add_scalar(f"analysis/{split}/ece", ece)
        for mode in ("none", "flip", "flip_zoom"):
            top1 = float((preds.tta(mode).argmax(1) == preds.targets).float().mean())
            writer.add_scalar(f"analysis/{split}/top1_tta_{mode}", top1)
        for png in sorted(out.glob("*.png")):
            with Image.open(io.BytesIO(png.read_bytes())) as image:
                array = np.asarray(image.convert("RGB"))
            writer.add_image(f"analysis/{split}/{png.stem}", array, dataformats="HWC")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swin_lightning analyze",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("--ckpt_path", required=True, help="a run folder or its checkpoint")
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--out", default=None, help="default: <run>/analysis/<split>")
    parser.add_argument("--k", type=int, default=16, help="worst and best images shown")
    parser.add_argument("--cams", type=int, default=2, help="images per class with CAMs")
    parser.add_argument("--temperature", action="store_true",
                        help="fit a temperature on val and report the ECE it gives")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        report = analyze(args.ckpt_path, args.split, args.out, args.k, args.cams, args.temperature)
    except (CheckpointError, ExportError, FileNotFoundError, WriteError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if not isinstance(err, WriteError) else 1
    print(f"[analyze] {report}")
    return 0
