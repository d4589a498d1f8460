"""Table 2: framework overhead, a plain PyTorch loop against ``Trainer.fit``."""

from __future__ import annotations

import time

import torch
from torch import nn

from swin_lightning.bench.harness import interleaved


def bench_overhead(rounds: int, steps: int, batch: int = 64, warmup: int = 1) -> dict[str, float]:
    """Seconds per training step at the demo shape: plain loop vs Trainer.fit, each case
    run ``warmup`` times untimed first."""
    import lightning as L
    from torch.utils.data import DataLoader

    from swin_lightning.data.embedded import draw_shapes
    from swin_lightning.models import SwinTransformer

    def net():
        torch.manual_seed(0)
        return SwinTransformer(
            img_size=32,
            patch_size=2,
            num_classes=10,
            embed_dim=48,
            depths=(2, 2),
            num_heads=(3, 6),
            window_size=4,
            drop_path_rate=0.0,
        )

    images, labels = draw_shapes(batch * steps, 10, 32, 0, 0.1)
    dataset = torch.utils.data.TensorDataset(images, labels)

    def loader():
        return DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=0)

    class Plain(L.LightningModule):
        """The plain loop's work, as a LightningModule: forward, loss, AdamW."""

        def __init__(self):
            super().__init__()
            self.net = net()

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class EpochTimer(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            self.seconds = time.perf_counter() - self.start

    def fit(module_fn, **trainer_kwargs) -> float:
        timer = EpochTimer()
        trainer = L.Trainer(
            accelerator="cpu",
            max_epochs=1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            enable_checkpointing=False,
            enable_model_summary=False,
            logger=False,
            enable_progress_bar=False,
            callbacks=[timer],
            **trainer_kwargs,
        )
        trainer.fit(module_fn(), train_dataloaders=loader())
        return timer.seconds / steps

    def plain_loop() -> float:
        model = net()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()
        start = time.perf_counter()
        for x, y in loader():
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (time.perf_counter() - start) / steps

    def full_module():
        from swin_lightning.classifier import SwinClassifier

        return SwinClassifier(net(), label_smoothing=0.0)

    cases = {
        "plain PyTorch loop": plain_loop,
        "Trainer.fit, same work": lambda: fit(Plain),
        "Trainer.fit, SwinClassifier (metrics, logging)": lambda: fit(full_module),
    }
    return interleaved(cases, rounds, warmup=warmup, self_timed=True)
