"""Pictures of windows, the cyclic shift, the attention mask and attention maps.

Used by the notebooks and by :class:`WindowAttentionImages`, the callback that logs them to
TensorBoard (the CLI's ``attention_images.*`` keys). Every function returns a matplotlib ``Figure`` built without pyplot, so
nothing here changes the global backend or keeps figures alive.
"""

from __future__ import annotations

import lightning as L
import torch
from matplotlib.figure import Figure

from swin_lightning.models.swin import SwinBlock, SwinTransformer
from swin_lightning.models.windows import shift_region_ids


def _figure(rows: int, cols: int, width: float, height: float):
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")  # room for titles
    return fig, fig.subplots(rows, cols, squeeze=False)


def _window_lines(ax, H: int, W: int, window: tuple[int, int], offset: tuple[int, int] = (0, 0)):
    for r in range(offset[0] % window[0], H + 1, window[0]):
        ax.axhline(r - 0.5, color="white", lw=2)
    for c in range(offset[1] % window[1], W + 1, window[1]):
        ax.axvline(c - 0.5, color="white", lw=2)


def plot_windows(block: SwinBlock, shifted: SwinBlock | None = None) -> Figure:
    """Token grid of a stage: W-MSA windows, SW-MSA windows, and the shift's regions.

    Left: the regular partition. Middle: the shifted partition drawn on the image (windows
    offset by half a window). Right: the image after the cyclic shift, coloured by the
    region each token came from; tokens of different colours share a window but must not
    attend to each other, which is what the attention mask enforces.
    """
    H, W = block.padded_size(*block.input_resolution)
    panels = 3 if shifted is not None and shifted.shifted else 1
    fig, axes = _figure(1, panels, 4 * panels, 4)
    axes = axes[0]
    windows = _token_windows(block, H, W)  # (nW, N): token ids of each window
    cols = W // block.window_size[1]
    checker = torch.zeros(H * W, dtype=torch.long)
    for w, ids in enumerate(windows):
        checker[ids] = (w // cols + w % cols) % 2  # alternate like a chessboard
    checker = checker.view(H, W)
    axes[0].imshow(checker, cmap="Pastel1", vmin=0, vmax=8)
    _window_lines(axes[0], H, W, block.window_size)
    axes[0].set_title(
        f"W-MSA: {H}x{W} tokens,\n{block.window_size[0]}x{block.window_size[1]} windows"
    )
    if panels == 3:
        s = shifted.shift_size
        axes[1].imshow(checker, cmap="Pastel1", vmin=0, vmax=8)
        _window_lines(axes[1], H, W, shifted.window_size, offset=(-s[0], -s[1]))
        axes[1].set_title(f"SW-MSA: windows\nshifted by {s[0]},{s[1]}")
        regions = shift_region_ids(H, W, shifted.window_size, s)
        axes[2].imshow(regions, cmap="tab10", vmin=0, vmax=9)
        _window_lines(axes[2], H, W, shifted.window_size)
        axes[2].set_title("after the cyclic shift:\nsource regions")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def plot_attention_mask(block: SwinBlock) -> Figure:
    """The additive mask of the four kinds of shifted window (interior, right/bottom edges, corner)."""
    H, W = block.padded_size(*block.input_resolution)
    mask = block.shift_mask(H, W, torch.device("cpu"))
    fig, axes = _figure(1, 4, 13, 3.9)
    axes = axes[0]
    if mask is None:
        for ax in axes:
            ax.axis("off")
        axes[0].set_title("no shift: no mask")
        return fig
    cols = W // block.window_size[1]
    picks = {"interior window": 0, "right edge": cols - 1, "bottom edge": mask.shape[0] - cols,
             "corner": mask.shape[0] - 1}  # fmt: skip
    for ax, (name, index) in zip(axes, picks.items(), strict=True):
        ax.imshow(mask[index].cpu(), cmap="gray", vmin=mask.min().item(), vmax=0)
        ax.set_title(f"{name} (window {index})\nblack: masked (-100)")
        ax.set_xlabel("key token")
        ax.set_ylabel("query token")
    return fig


def _token_windows(block: SwinBlock, H: int, W: int) -> torch.Tensor:
    """Which token sits in each slot of each window when ``block`` partitions an ``H x W``
    grid (its own padding and cyclic shift, :meth:`SwinBlock.to_windows`): ``(nW, N)`` token
    ids ``row * W + col`` in original coordinates, -1 for padding."""
    ids = torch.arange(1, H * W + 1, dtype=torch.float).view(1, H, W, 1)  # 0: the padding
    return block.to_windows(ids)[0][0, :, :, 0].long() - 1


def _query_map(block: SwinBlock, probs: torch.Tensor, query: tuple[int, int], H: int, W: int):
    """Head-averaged attention of ``query`` (original coordinates) placed on the H x W grid."""
    windows = _token_windows(block, H, W)
    window, slot = (windows == query[0] * W + query[1]).nonzero()[0].tolist()
    weights = probs[window, :, slot].mean(0)  # (N,) over the window's keys
    out = torch.zeros(H * W)
    keys = windows[window]
    real = keys >= 0
    out[keys[real]] = weights[real]
    return out.view(H, W)


def plot_attention_maps(
    net: SwinTransformer, images: torch.Tensor, stage: int = 0, query: tuple[int, int] | None = None
) -> Figure:
    """For each image: where one query token looks in the W-MSA and the SW-MSA block.

    The default query sits at the centre of the stage's grid, on a window corner: W-MSA
    confines it to one window, the shifted window lets it reach across the border.
    """
    blocks = list(net.layers[stage].blocks)[:2]
    inputs: list[torch.Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for b in blocks]
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(images)
    finally:
        for h in hooks:
            h.remove()
        net.train(was_training)
    H, W = inputs[0].shape[1:3]
    query = query or (H // 2, W // 2)
    fig, axes = _figure(len(images), 1 + len(blocks), 3.2 * (1 + len(blocks)), 3.2 * len(images))
    lo, hi = images.amin(dim=(1, 2, 3), keepdim=True), images.amax(dim=(1, 2, 3), keepdim=True)
    shown = ((images - lo) / (hi - lo + 1e-8)).permute(0, 2, 3, 1).cpu()
    extent = (-0.5, W - 0.5, H - 0.5, -0.5)
    for b, block in enumerate(blocks):
        probs = block.attention_probs(inputs[b]).float().cpu()
        for i in range(len(images)):
            ax = axes[i, 1 + b]
            ax.imshow(shown[i], extent=extent)
            ax.imshow(
                _query_map(block, probs[i], query, H, W), cmap="inferno", alpha=0.7, extent=extent
            )
            ax.plot(query[1], query[0], "c+", ms=12, mew=2)
            if i == 0:
                ax.set_title(
                    f"stage {stage + 1} block {b + 1}: {'SW-MSA' if block.shifted else 'W-MSA'}"
                )
    for i in range(len(images)):
        axes[i, 0].imshow(shown[i])
        axes[i, 0].set_title("input" if i == 0 else "")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


class WindowAttentionImages(L.Callback):
    """TensorBoard pictures: windows, shift and mask once per run; attention maps while training.

    Args:
        every_n_epochs: Log attention maps of a fixed validation batch every n epochs (0: never).
        num_images: Images in that fixed batch.
        stage: Which stage (0-based) to picture.
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 2, stage: int = 0):
        if every_n_epochs < 0 or num_images < 1 or stage < 0:
            raise ValueError(
                "attention_images: every_n_epochs >= 0, num_images >= 1 and stage >= 0 required"
            )
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.stage = stage
        self._batch: torch.Tensor | None = None

    def _writer(self, trainer: L.Trainer):
        from lightning.pytorch.loggers import TensorBoardLogger

        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        return logger.experiment if logger is not None and trainer.is_global_zero else None

    def _blocks(self, net):
        if self.stage >= len(net.layers):
            raise ValueError(
                f"attention_images.stage={self.stage}: the model has {len(net.layers)} stages"
            )
        return list(net.layers[self.stage].blocks)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = self._writer(trainer)
        if writer is None:
            return
        blocks = self._blocks(pl_module.net)
        shifted = blocks[1] if len(blocks) > 1 else None
        writer.add_figure("windows/partition_and_shift", plot_windows(blocks[0], shifted), 0)
        if shifted is not None:
            writer.add_figure("windows/attention_mask", plot_attention_mask(shifted), 0)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = self._writer(trainer)
        epoch = trainer.current_epoch
        if writer is None or trainer.sanity_checking or not self.every_n_epochs:
            return
        if epoch % self.every_n_epochs:
            return
        if self._batch is None:
            self._batch = trainer.datamodule.example_images(self.num_images)
        images = self._batch.to(pl_module.device)
        fig = plot_attention_maps(pl_module.net, images, self.stage)
        writer.add_figure("attention/maps", fig, trainer.global_step)
