"""``python -m swin_lightning {fit,validate,test,predict}``: LightningCLI for Swin experiments."""

from __future__ import annotations

from lightning import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from swin_lightning.callbacks import (
    ImageThroughputMonitor,
    PredictionCSVWriter,
    WindowAttentionImages,
)
from swin_lightning.data import ClassificationDataModule
from swin_lightning.module import SwinClassifier

TRAINER_DEFAULTS = {
    # One versioned folder per run under logs/<name>/version_<n>: never overwritten.
    "trainer.logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "logs", "name": "swin"},
    },
}


class SwinCLI(LightningCLI):
    """LightningCLI with data -> model links and the project's default callbacks."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data decides image size and class count; the model is built to match.
        parser.link_arguments(
            "data.image_size", "model.net.init_args.img_size", apply_on="instantiate"
        )
        parser.link_arguments(
            "data.num_classes", "model.net.init_args.num_classes", apply_on="instantiate"
        )
        parser.set_defaults(TRAINER_DEFAULTS)
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc1",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch{epoch:03d}-acc1_{val/acc1:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(ImageThroughputMonitor, "throughput")
        parser.add_lightning_class_args(PredictionCSVWriter, "prediction_writer")
        parser.add_lightning_class_args(WindowAttentionImages, "attention_images")

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """Add a rich progress bar unless the bar is off or the config brings its own."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        wants_bar = config.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs.setdefault("callbacks", [*callbacks, RichProgressBar()])
        return super().instantiate_trainer(**kwargs)


def cli_main(args: list[str] | None = None, run: bool = True) -> SwinCLI:
    """Run the CLI; ``args`` as on the command line (None: ``sys.argv``)."""
    return SwinCLI(
        SwinClassifier,
        ClassificationDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=42,
        args=args,
        run=run,
    )
