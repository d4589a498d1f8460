"""``python -m swin_lightning {fit,validate,test,predict}``: LightningCLI for Swin experiments."""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import logging
import os
import re
import signal
import sys
import warnings
from pathlib import Path

import yaml
from lightning import LightningModule, Trainer
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from swin_lightning.callbacks import (
    ImageThroughputMonitor,
    PartialPredictionError,
    PredictionCSVWriter,
    RunCostMonitor,
)
from swin_lightning.classifier import SwinClassifier
from swin_lightning.data import ClassificationDataModule
from swin_lightning.protocol import LAUNCHER_ENV, SIGINT_EXIT_CODE, SIGTERM_EXIT_CODE
from swin_lightning.resilience import (
    CheckedCheckpointIO,
    NonFiniteLossGuard,
    Preflight,
    ResumeState,
    StepCheckpoint,
)
from swin_lightning.run_folder import claim_run_folder, resolve_resume
from swin_lightning.storage import (
    CheckpointError,
    RunBusyError,
    WriteError,
    load_checkpoint,
    write_text,
)
from swin_lightning.visualize import WindowAttentionImages

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
# Shown as one "error:" line whenever they happen: a failed write (exit 1), a run folder in use
# or a damaged checkpoint (exit 2), some predict images unreadable (exit 1).
ALWAYS_ONE_LINE = (WriteError, RunBusyError, CheckpointError, PartialPredictionError)
EVAL_SUBCOMMANDS = ("validate", "test", "predict")


class SaveRunConfig(SaveConfigCallback):
    """Writes the run's resolved ``config.yaml`` once the run has been accepted.

    Lightning's callback writes it in ``setup``, before the checkpoint is loaded and checked,
    so a refused resume (weights of another shape) would overwrite the run's config with the
    refused settings. Here it is written when the first batch loop starts (sanity check,
    training, validation, test or predict), after every check, atomically
    (:func:`swin_lightning.storage.write_text`).
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        pass

    def _write_once(self, trainer: Trainer, *args) -> None:
        if self.already_saved:
            return
        log_dir = trainer.log_dir  # broadcast from rank 0: every rank asks
        if trainer.is_global_zero and log_dir is not None:
            text = self.parser.dump(self.config, skip_none=False)
            write_text(os.path.join(log_dir, self.config_filename), text)
        self.already_saved = True

    on_sanity_check_start = on_train_start = _write_once
    on_validation_start = on_test_start = on_predict_start = _write_once


PRETRAINING_MODELS = ("swin_lightning.simmim.SimMIM", "swin_lightning.SimMIM", "SimMIM")


def check_config_files(args: list[str]) -> str | None:
    """Each ``--config FILE`` exists and holds a YAML mapping; else ValueError naming it.

    Returns the ``model.class_path`` the configs set (the last one wins), or None: the
    classifier, whose configs give its arguments directly under ``model``.
    """
    class_path = None
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        else:
            continue
        path = Path(value)
        if not path.is_file():
            if value.endswith((".yaml", ".yml", ".json")):
                raise FileNotFoundError(f"--config {value}: no such file")
            continue  # an inline YAML string, which jsonargparse parses itself
        try:
            content = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"--config {value}: invalid YAML{where}: {problem}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"--config {value}: cannot be read ({err})") from None
        if not isinstance(content, dict):
            kind = "empty" if content is None else f"a {type(content).__name__}"
            raise ValueError(
                f"--config {value} is {kind}, not a mapping of settings; a config looks like "
                "'trainer: {max_epochs: 2}' (see configs/demo.yaml)"
            )
        model = content.get("model")
        if isinstance(model, dict) and "class_path" in model:
            class_path = model["class_path"]
            if class_path not in PRETRAINING_MODELS:
                raise ValueError(
                    f"--config {value}: model.class_path={class_path!r} is not a model of "
                    f"this project; the classifier takes its settings directly under 'model:' "
                    f"(see configs/demo.yaml), and SimMIM pretraining is 'class_path: "
                    f"{PRETRAINING_MODELS[0]}' (see configs/simmim/pretrain_demo.yaml)"
                )
    return class_path


def require_weights(config, subcommand: str) -> None:
    """validate/test/predict need trained weights, unless ``allow_random_weights``."""
    model = config.model.get("init_args") or config.model  # SimMIM: a class_path/init_args
    if config.get("ckpt_path") or model.get("pretrained"):
        return
    if config.get("allow_random_weights"):
        return
    raise ValueError(
        f"{subcommand} needs trained weights: pass --ckpt_path (a checkpoint file, or 'last' "
        "for the experiment's newest run) or --model.pretrained=<weights file>; "
        "--allow_random_weights=true evaluates an untrained model on purpose"
    )


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
    """Print ``error: <message>`` and exit with 2, as a parse error does (1 for a failed
    write or unreadable predict images: the settings were fine, the run was not)."""
    if os.environ.get("JSONARGPARSE_DEBUG"):
        raise err
    sys.stderr.write(f"error: {_input_error_message(err)}\n")
    raise SystemExit(1 if isinstance(err, WriteError | PartialPredictionError) else 2) from err


def finish_logger_runs(trainer: Trainer | None, failed: bool) -> None:
    """Finish the W&B run of each ``WandbLogger`` this command started.

    W&B holds an offline run's history in memory until the run finishes (the run file is its
    7-byte header until then), and Lightning leaves the run open. One command is one run, so it
    ends with the command, and a later command in the same process starts a new run instead of
    reusing this one. ``run.finish`` only tells W&B's service process that the run is over; the
    service writes the rest of the run file when it closes the run, later (under load a test
    once read the file before that). So where no other W&B run is open in this process, the
    service is shut down too, which waits for it: the files are complete when ``cli_main``
    returns, in-process too.
    """
    from lightning.pytorch.loggers import WandbLogger

    finished = False
    for logger in trainer.loggers if trainer is not None else ():
        run = getattr(logger, "_experiment", None) if isinstance(logger, WandbLogger) else None
        if run is not None:
            run.finish(exit_code=1 if failed else 0)
            finished = True
    if finished:
        import wandb

        if wandb.run is None:  # a user's own open run (a notebook) keeps the service alive
            wandb.teardown()


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
        pretraining = self.subclass_mode_model  # SimMIM: model.class_path + init_args
        net = "model.init_args.net" if pretraining else "model.net"
        parser.link_arguments(
            "data.image_size", f"{net}.init_args.img_size", apply_on="instantiate"
        )
        if not pretraining:  # SimMIM builds no classification head
            parser.link_arguments(
                "data.num_classes", f"{net}.init_args.num_classes", apply_on="instantiate"
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
        if pretraining:  # no accuracy: keep the checkpoints of lowest reconstruction loss
            parser.set_defaults(
                {
                    "checkpoint.monitor": "val/loss",
                    "checkpoint.mode": "min",
                    "checkpoint.filename": "epoch{epoch:03d}-loss_{val/loss:.4f}",
                }
            )
        parser.add_lightning_class_args(StepCheckpoint, "step_checkpoint")
        parser.add_lightning_class_args(NonFiniteLossGuard, "nan_guard")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(ImageThroughputMonitor, "throughput")
        parser.add_lightning_class_args(PredictionCSVWriter, "prediction_writer")
        parser.add_lightning_class_args(WindowAttentionImages, "attention_images")
        parser.add_argument(
            "--allow_random_weights",
            type=bool,
            default=False,
            help="validate/test/predict: allow a model without trained weights (no "
            "--ckpt_path and no model.pretrained); otherwise that is an error",
        )

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        if self.parser_class is LightningArgumentParser:
            self.parser_class = SwinArgumentParser
        return super().init_parser(**kwargs)

    def instantiate_classes(self) -> None:
        """Build model, data and trainer; a setting they reject is one ``error:`` line."""
        try:
            super().instantiate_classes()
        except BaseException as err:
            self._leave_run_folder(abandon=True)
            if isinstance(err, INPUT_ERRORS):
                _exit_on_input_error(err)
            raise
        ckpt = self.config[self.subcommand].get("ckpt_path") if self.subcommand else None
        if self.subcommand in EVAL_SUBCOMMANDS and ckpt and Path(ckpt).is_file():
            # validate/test/predict save no checkpoint: their checkpoint callbacks take the
            # folder of the run that made the weights, so restoring that run's callback state
            # is complete, with no warning that the folder "has changed".
            states = load_checkpoint(ckpt, mmap=True).get("callbacks", {})
            for callback in self.trainer.checkpoint_callbacks:
                dirpath = states.get(callback.state_key, {}).get("dirpath")
                if dirpath:
                    callback.dirpath = dirpath

    def _run_subcommand(self, subcommand: str) -> None:
        # Data setup, checkpoint loading and optimizer checks fail before the first batch.
        started = completed = False
        if os.environ.get(LAUNCHER_ENV):  # a run of `ablate`: say what it was given
            import torch

            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
            print(f"[{subcommand}] launcher: {os.environ[LAUNCHER_ENV]}, torch threads: "
                  f"{torch.get_num_threads()}, CUDA_VISIBLE_DEVICES={visible}",
                  file=sys.stderr, flush=True)  # fmt: skip
        try:
            super()._run_subcommand(subcommand)
            started = completed = True
        except SIGTERMException:
            started = True
            stop = next((c for c in self.trainer.callbacks if isinstance(c, StepCheckpoint)), None)
            stopped_by_sigint = stop is not None and stop.stop_signal == signal.SIGINT
            sys.exit(SIGINT_EXIT_CODE if stopped_by_sigint else SIGTERM_EXIT_CODE)
        except INPUT_ERRORS + ALWAYS_ONE_LINE as err:
            started = _batches_started(getattr(self, "trainer", None))
            if started and not isinstance(err, ALWAYS_ONE_LINE):
                raise
            _exit_on_input_error(err)
        except BaseException:
            started = True
            raise
        finally:
            finish_logger_runs(getattr(self, "trainer", None), failed=not completed)
            self._leave_run_folder(abandon=not started)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the hyperparameters of a --ckpt_path file right after parsing,
        # with a bare torch.load: check the file first, so a damaged one is one error line.
        subcommand = self.config.get("subcommand")
        ckpt = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt and Path(ckpt).is_file():
            try:
                hparams = load_checkpoint(ckpt, mmap=True).get("hyper_parameters") or {}
                check_module_kind(ckpt, hparams, pretraining=self.subclass_mode_model)
            except (CheckpointError, ValueError) as err:
                _exit_on_input_error(err)
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        """Check the run before anything is built or written: resolve ``--ckpt_path
        last|auto`` (the checkpoint must be intact), require weights for validate/test/predict,
        and claim the run folder (a new ``version_<n>``, locked for this process)."""
        self._run_lock = None
        if self.subcommand is None:
            return
        config = self.config[self.subcommand]
        try:
            resolve_resume(config, self.subcommand)
            if self.subcommand in EVAL_SUBCOMMANDS:
                require_weights(config, self.subcommand)
            self._run_lock = claim_run_folder(config, self.subcommand)
        except INPUT_ERRORS + ALWAYS_ONE_LINE as err:
            _exit_on_input_error(err)

    def _leave_run_folder(self, abandon: bool) -> None:
        """Release the run folder's lock; a run refused before it started leaves the folder
        as it found it (and no new folder)."""
        lock = getattr(self, "_run_lock", None)
        self._run_lock = None
        if lock is not None:
            if abandon:
                lock.undo()
            lock.release()

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """Add the random-state checkpointing, the preflight check, the cost monitor, and a rich progress bar unless the bar is off or
        the config brings its own."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = [*(callbacks if isinstance(callbacks, list) else [callbacks]), ResumeState()]
        callbacks += [Preflight(), RunCostMonitor()]
        from swin_lightning.runs.pruning import trial_pruning_from_env

        pruning = trial_pruning_from_env()  # a trial of `tune`: report to its study, prune
        if pruning is not None:
            callbacks.append(pruning)
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(CheckedCheckpointIO())  # checked, atomic checkpoint writes
        if os.environ.get(LAUNCHER_ENV) == "slurm" and not any(
            isinstance(p, ClusterEnvironment) for p in plugins
        ):  # submitit owns requeueing (on USR2); Lightning's own (on USR1) stays off
            plugins.append(SLURMEnvironment(auto_requeue=False))
        kwargs.setdefault("plugins", plugins)
        wants_bar = config.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(RichProgressBar())
        kwargs.setdefault("callbacks", callbacks)
        return super().instantiate_trainer(**kwargs)


class DropMessage(logging.Filter):
    """Drops one library message, by its opening words, from the logger that emits it."""

    def __init__(self, opening: str):
        super().__init__()
        self.opening = opening

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.opening)


def quiet_adverts() -> None:
    """Two library messages no user can act on, each dropped where it is raised, by its
    text: Lightning's tip to install its cloud logger (logged on every run, no switch), and
    the deprecation torch >= 2.10 raises inside Lightning's own pytree helper."""
    from lightning_utilities.core import rank_zero

    if not any(isinstance(f, DropMessage) for f in rank_zero.log.filters):
        rank_zero.log.addFilter(DropMessage("💡 Tip: For seamless cloud"))
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        module=r"lightning\.pytorch\.utilities\._pytree",
    )


def check_module_kind(ckpt: str | Path, hparams: dict, pretraining: bool) -> None:
    """A ValueError when ``ckpt`` was written by the other module kind (a SimMIM pretraining
    checkpoint given to a classifier, or the reverse): its hyperparameters would not parse."""
    if not hparams:
        return  # no record of who wrote it: the module's own load decides
    written_by = str(hparams.get("_class_path", "swin_lightning.classifier.SwinClassifier"))
    is_simmim = written_by.rpartition(".")[2] == "SimMIM"
    if is_simmim and not pretraining:
        raise ValueError(
            f"--ckpt_path {ckpt} is a SimMIM pretraining checkpoint, not a classifier's: to "
            "fine-tune from its encoder, fit a classifier with --model.pretrained "
            f"{ckpt} (configs/simmim/finetune_demo.yaml or finetune_swin_t.yaml); --ckpt_path "
            "resumes or evaluates a run of the same kind"
        )
    if pretraining and not is_simmim:
        raise ValueError(
            f"--ckpt_path {ckpt} is a classifier's checkpoint ({written_by}), not a SimMIM "
            "pretraining one: --ckpt_path resumes or evaluates a run of the same kind; start "
            "the pretraining without it"
        )


def model_class_of(args: list[str]) -> type[LightningModule]:
    """The LightningModule the configs of ``args`` ask for: SimMIM pretraining when one sets
    ``model.class_path`` to it (given as a subclass), else the classifier. Checks the config
    files first (:func:`check_config_files`)."""
    if check_config_files(args) is None:
        return SwinClassifier
    from swin_lightning.simmim import SimMIM

    return SimMIM


def cli_main(args: list[str] | None = None, run: bool = True) -> SwinCLI:
    """Run the CLI; ``args`` as on the command line (None: ``sys.argv``).

    A run stopped by SIGTERM (its checkpoint saved) exits with code 143, or 130 for Ctrl+C,
    not 0, so schedulers and ``ablate`` do not take it for a finished run.
    """
    quiet_adverts()
    try:
        model_class = model_class_of(sys.argv[1:] if args is None else list(args))
    except ValueError as err:
        _exit_on_input_error(err)
    try:
        return SwinCLI(
            model_class,
            ClassificationDataModule,
            subclass_mode_model=model_class is not SwinClassifier,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_callback=SaveRunConfig,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=42,
            args=args,
            run=run,
        )
    except SIGTERMException:
        sys.exit(SIGTERM_EXIT_CODE)


def _parse_error(printed: str) -> str:
    """The parser's error as one line, from what it printed: its ``error:`` line and what
    follows, without the warnings Lightning printed before it."""
    lines = [ln.strip() for ln in printed.splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if ln.startswith("error:")), 0)
    return " ".join(lines[start:]).removeprefix("error: ") or "invalid settings"


# Settings that say where a run writes, not what it computes: left out of its fingerprint.
VOLATILE_KEYS = (
    ("trainer", "logger"), ("trainer", "enable_progress_bar"), ("trainer", "default_root_dir"),
    ("checkpoint", "dirpath"), ("prediction_writer", "output"), ("seed_everything",),
)  # fmt: skip


def resolved_settings(args: list[str]) -> dict:
    """The full config ``fit`` would run with ``args`` (no subcommand), without building
    anything, minus :data:`VOLATILE_KEYS`. A rejected setting raises ValueError with the
    parser's message."""
    import contextlib
    import io

    class _ParseOnly(SwinCLI):
        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

    model_class = model_class_of(args)  # SimMIM configs too (a campaign over pretraining)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            cli = _ParseOnly(
                model_class, ClassificationDataModule,
                subclass_mode_model=model_class is not SwinClassifier, subclass_mode_data=True,
                auto_configure_optimizers=False, seed_everything_default=42, args=args,
                run=False,
            )  # fmt: skip
    except SystemExit:
        raise ValueError(_parse_error(stderr.getvalue())) from None
    settings = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False)) or {}
    for path in VOLATILE_KEYS:
        node = settings
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return settings
