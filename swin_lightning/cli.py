"""``python -m swin_lightning {fit,validate,test,predict}``: LightningCLI for Swin experiments."""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import os
import re
import sys

from lightning import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from swin_lightning.callbacks import (
    ImageThroughputMonitor,
    PredictionCSVWriter,
    WindowAttentionImages,
)
from swin_lightning.data import ClassificationDataModule
from swin_lightning.module import SwinClassifier
from swin_lightning.resilience import (
    SIGTERM_EXIT_CODE,
    NonFiniteLossGuard,
    ResumeState,
    StepCheckpoint,
    resolve_resume,
)

TRAINER_DEFAULTS = {
    # One versioned folder per run under logs/<name>/version_<n>: never overwritten.
    "trainer.logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "logs", "name": "swin"},
    },
}


# Bad settings our constructors, setup and hooks reject: shown as one "error:" line when raised
# before the first batch (set JSONARGPARSE_DEBUG=1 for the traceback).
INPUT_ERRORS = (ValueError, OSError)


def _parser_keys(parser: argparse.ArgumentParser) -> set[str]:
    """Every key a parser (and its subcommands) accepts, e.g. ``trainer.max_epochs``."""
    keys = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                keys |= _parser_keys(sub)
        elif action.option_strings and action.dest not in ("help", argparse.SUPPRESS):
            keys.add(action.dest)
    return keys


def _class_params(class_path: str) -> list[str]:
    """Constructor arguments of ``class_path`` (empty if it cannot be imported)."""
    module, _, name = class_path.rpartition(".")
    try:
        params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return []
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [n for n, p in params.items() if p.kind not in skip and n != "params"]


def suggest_key(message: str, parser: argparse.ArgumentParser) -> str:
    """' Did you mean ...?' for the unknown key a jsonargparse error names, or ''."""
    unknown = re.search(
        r"unrecognized arguments: .*?--([\w.]+)|does not accept option '([\w.]+)'"
        r"|Option '([\w.]+)' is not accepted",
        message,
    )
    if unknown is None:
        return ""
    name = next(g for g in unknown.groups() if g)
    group = re.search(r"Group '([\w.]+)' does not accept", message)
    class_path = re.search(r"class_path(?: |=)'([\w.]+)'", message)
    if class_path and unknown.group(3):  # an argument of a class given by class_path
        params = _class_params(class_path.group(1))
        close = difflib.get_close_matches(name, params, n=1)
        where = re.search(r'Parser key "([\w.]+)"', message)
        owner = f"{where.group(1)} ({class_path.group(1)})" if where else class_path.group(1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return f"\n{hint.strip()} Valid keys of {owner}: {', '.join(params)}".rstrip()
    full = f"{group.group(1)}.{name}" if group else name
    close = difflib.get_close_matches(full, sorted(_parser_keys(parser)), n=1)
    return f"\nDid you mean '{close[0]}'?" if close else ""


class SwinArgumentParser(LightningArgumentParser):
    """Parser whose errors name the closest valid key and skip the page-long usage block.

    Prefixes of keys are not accepted (argparse's ``allow_abbrev``): a typo such as
    ``--trainer.max_epoch`` is an error with a suggestion, never another setting.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        if self.exit_on_error and "Did you mean" not in message:
            message += suggest_key(message, getattr(ex, "subcommand_parser", None) or self)
        return super().error(message, ex)

    def print_usage(self, file=None) -> None:
        # Only called on errors, which add a "run --help" tip; the full usage is in --help.
        pass


def _input_error_message(err: BaseException) -> str:
    """The message of the error the user caused, not of jsonargparse's wrapper around it."""
    while err.__cause__ is not None and "jsonargparse" in _raised_in(err):
        err = err.__cause__
    message = str(err)
    if "Original Traceback" in message:  # re-raised from a DataLoader worker: its last line
        message = message.strip().splitlines()[-1]
    return message


def _raised_in(err: BaseException) -> str:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename if tb is not None else ""


def _exit_on_input_error(err: BaseException) -> None:
    """Print ``error: <message>`` and exit with 2, as a parse error does."""
    if os.environ.get("JSONARGPARSE_DEBUG"):
        raise err
    sys.stderr.write(f"error: {_input_error_message(err)}\n")
    raise SystemExit(2) from err


def _batches_started(trainer: Trainer | None) -> bool:
    if trainer is None:
        return False
    fit = trainer.fit_loop.epoch_loop
    loops = (fit, fit.val_loop, trainer.validate_loop, trainer.test_loop, trainer.predict_loop)
    return any(loop.batch_progress.total.ready for loop in loops)


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
                # last.ckpt is shared with step_checkpoint: overwrite it, never last-v1.ckpt.
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(StepCheckpoint, "step_checkpoint")
        parser.add_lightning_class_args(NonFiniteLossGuard, "nan_guard")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(ImageThroughputMonitor, "throughput")
        parser.add_lightning_class_args(PredictionCSVWriter, "prediction_writer")
        parser.add_lightning_class_args(WindowAttentionImages, "attention_images")

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        if self.parser_class is LightningArgumentParser:
            self.parser_class = SwinArgumentParser
        return super().init_parser(**kwargs)

    def instantiate_classes(self) -> None:
        """Build model, data and trainer; a setting they reject is one ``error:`` line."""
        try:
            super().instantiate_classes()
        except INPUT_ERRORS as err:
            _exit_on_input_error(err)

    def _run_subcommand(self, subcommand: str) -> None:
        # Data setup, checkpoint loading and optimizer checks fail before the first batch.
        try:
            super()._run_subcommand(subcommand)
        except INPUT_ERRORS as err:
            if _batches_started(getattr(self, "trainer", None)):
                raise
            _exit_on_input_error(err)

    def before_instantiate_classes(self) -> None:
        """Resolve ``--ckpt_path last|auto``; a resumed fit logs into the run's own folder."""
        if self.subcommand is not None:
            try:
                resolve_resume(self.config[self.subcommand], self.subcommand)
            except INPUT_ERRORS as err:
                _exit_on_input_error(err)

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """Add the random-state checkpointing, and a rich progress bar unless the bar is off or
        the config brings its own."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = [*(callbacks if isinstance(callbacks, list) else [callbacks]), ResumeState()]
        wants_bar = config.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(RichProgressBar())
        kwargs.setdefault("callbacks", callbacks)
        return super().instantiate_trainer(**kwargs)


def cli_main(args: list[str] | None = None, run: bool = True) -> SwinCLI:
    """Run the CLI; ``args`` as on the command line (None: ``sys.argv``).

    A run stopped by SIGTERM (its checkpoint saved) exits with code 143, not 0, so schedulers
    and ``ablate`` do not take it for a finished run.
    """
    try:
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
    except SIGTERMException:
        sys.exit(SIGTERM_EXIT_CODE)
