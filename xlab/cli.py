"""The `xlab.py` command line: LightningCLI over `LanguageModel` and `XLabDataModule`.

Configs layer as code defaults < conf/defaults.yaml < each `-c FILE` < command-line flags.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, RichModelSummary, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from xlab.callbacks import FlopsSummary, PredictionWriter, ProgressBar, Throughput
from xlab.checkpoint import (
    EXPORT_TOKENIZER,
    CheckpointError,
    fresh_name,
    read_checkpoint_file,
    read_export_meta,
    run_folder,
)
from xlab.data import XLabDataModule
from xlab.module import LanguageModel, NonFiniteLoss
from xlab.tokenizer import Tokenizer

DEFAULTS = Path(__file__).resolve().parent.parent / "conf" / "defaults.yaml"


DATA_COMMANDS = ("prepare_data", "train_tokenizer", "compute_stats")  # XLabDataModule methods, no trainer needed
EVALUATIONS = ("validate", "test", "predict")
DESCRIPTIONS = {  # Lightning's docstrings describe the Trainer methods, not what they do here
    "fit": "Train the model, or resume a run with --ckpt_path (into the same run folder).",
    "validate": "Report val/loss, val/perplexity and val/accuracy of a checkpoint (--ckpt_path) on the val split.",
    "test": "Report test/loss, test/perplexity and test/accuracy of a checkpoint (--ckpt_path) on the test split.",
    "predict": "Continue prompts with a checkpoint (--ckpt_path) and write them to predictions.jsonl.",
}
info = rank_zero_only(logging.getLogger(__name__).info)


class XLabCLI(LightningCLI):
    evaluated: tuple[Tokenizer, str | None] | None = None  # the evaluated checkpoint's tokenizer and data fingerprint

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), **{name: set() for name in DATA_COMMANDS}}

    def _add_subcommands(self, parser, **kwargs) -> None:
        """LightningCLI's, except that the data commands are described by the DataModule's methods rather than
        the Trainer's: each takes the same config as fit and no extra arguments."""
        self._subcommand_parsers = {}
        subcommands = parser.add_subcommands()
        for name in self.subcommands():
            klass = XLabDataModule if name in DATA_COMMANDS else self.trainer_class
            sub_kwargs = {"description": DESCRIPTIONS.get(name) or first_paragraph(getattr(klass, name)),
                          **kwargs.get(name, {})}
            self._subcommand_parsers[name] = self._prepare_subcommand_parser(klass, name, **sub_kwargs)
            subcommands.add_subcommand(name, self._subcommand_parsers[name], help=sub_kwargs["description"])

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in EVALUATIONS:
            parser.add_argument("--untrained", type=bool, default=False,
                                help="evaluate a freshly initialised model on purpose, without --ckpt_path")
        return parser

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand in DATA_COMMANDS:
            getattr(self.datamodule, subcommand)()
            return
        log_dir = Path(self.trainer.log_dir)
        fresh = not log_dir.exists()
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            # a command that failed before doing anything leaves no run folder for TensorBoard to list
            if fresh and self.trainer.is_global_zero and not started(self.trainer, subcommand):
                shutil.rmtree(log_dir, ignore_errors=True)
            raise

    def _parse_ckpt_path(self) -> None:
        """Lightning applies all of a checkpoint's hyperparameters over the config. Only the architecture must
        come from the checkpoint (its weights fit no other); the rest (generation, optimiser, schedule) stays
        as the config and command line give it, so `predict --model.generation...` does what it says.
        `model.init_from` likewise brings its checkpoint's architecture, so that the config saved with the run
        records the architecture actually trained. Evaluation also takes the checkpoint's tokenizer and checks its
        data (`XLabDataModule.use_checkpoint`)."""
        subcommand = self.config.get("subcommand")
        if subcommand in DATA_COMMANDS or not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":  # the newest run's
            ckpt_path = config.ckpt_path = str(latest_checkpoint(config))
        init_from = config.model.get("init_from")
        if subcommand in EVALUATIONS and not (ckpt_path or init_from or config.untrained):
            raise ValueError(f"{subcommand} needs the checkpoint to evaluate: pass --ckpt_path=PATH (or last), "
                             "or --untrained=true to score a freshly initialised model on purpose")
        if init_from:
            self.use_arch(subcommand, checkpoint_arch(Path(init_from)))
        if ckpt_path and Path(ckpt_path).is_dir():
            self.use_export(subcommand, Path(ckpt_path))
        elif ckpt_path and Path(ckpt_path).is_file():
            meta = read_checkpoint_file(Path(ckpt_path))["xlab"]
            if subcommand != "fit" and meta.get("tokenizer"):
                self.evaluated = Tokenizer.from_str(meta["tokenizer"]), meta.get("data_fingerprint")
            self.use_arch(subcommand, meta["arch"])
        self.place_logs(subcommand, Path(ckpt_path) if ckpt_path else None)

    def use_arch(self, subcommand: str, arch: dict) -> None:
        self.config = self.parser.parse_object({subcommand: {"model": {"arch": arch}}}, self.config)

    def place_logs(self, subcommand: str, ckpt_path: Path | None) -> None:
        """Resuming a checkpoint of a run folder (`<run>/checkpoints/*.ckpt`) logs to that folder: one
        TensorBoard run, and ModelCheckpoint's best-k bookkeeping restored (Lightning restores it only into the
        same folder), its config saved as `config-resume-<time>.yaml` beside the run's own `config.yaml`. An
        evaluation logs to `<run>/eval/<stage>-<time>/` (`-2`, ... for more in the same second), or
        `<logs>/eval/<stage>-<time>/` for a checkpoint outside a run folder. TensorBoard and CSV loggers only."""
        args = logger_args(self.config[subcommand])
        if args is None or (subcommand == "fit" and ckpt_path is None):
            return
        run = run_folder(ckpt_path) if ckpt_path else None
        if subcommand == "fit":
            if run is None:
                return
            root = Path(args.save_dir or ".") / (args.name or "")
            if root.resolve() != run.parent.resolve():  # else the config's own path, kept as the run wrote it
                args.save_dir, args.name = str(run.parent), ""
            args.version = run.name
            if (run / "config.yaml").is_file():  # the run's own config stays; the resume's is saved beside it
                self.save_config_kwargs["config_filename"] = f"config-resume-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
            return
        # only rank 0 writes logs, and every rank reads the log folder from it (Trainer.log_dir broadcasts):
        # nodes whose clocks read another second agree on the folder
        base = run if run is not None else Path(args.save_dir or ".") / (args.name or "")
        args.save_dir, args.name = str(base / "eval"), ""
        args.version = fresh_name(base / "eval", f"{subcommand}-{time.strftime('%Y%m%d-%H%M%S')}")

    def use_export(self, subcommand: str, folder: Path) -> None:
        """An exported checkpoint (a folder: weights, architecture, tokenizer) holds no training state for
        Lightning to restore: evaluation loads its weights through `model.init_from` instead."""
        if subcommand == "fit":
            raise ValueError(f"{folder} is an exported checkpoint, without optimizer state to resume from: "
                             f"fine-tune from it with --model.init_from={folder} instead of --ckpt_path")
        meta = read_export_meta(folder)
        arch = meta["arch"]
        if (folder / EXPORT_TOKENIZER).is_file():
            self.evaluated = Tokenizer.load(folder / EXPORT_TOKENIZER), meta.get("data_fingerprint")
        self.config = self.parser.parse_object(
            {subcommand: {"ckpt_path": None, "model": {"arch": arch, "init_from": str(folder)}}}, self.config)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if self.evaluated is not None:
            self.datamodule.use_checkpoint(*self.evaluated)

    def add_arguments_to_parser(self, parser) -> None:
        # the tokenizer is trained to the data's vocabulary size and windows match the model's context
        # (a pretrained tokenizer brings its own size: the model's vocabulary is read from its file)
        parser.link_arguments(("data.vocab_size", "data.pretrained_tokenizer"), "model.arch.vocab_size",
                              compute_fn=XLabDataModule.model_vocab_size)
        parser.link_arguments("model.arch.context", "data.context")
        parser.add_lightning_class_args(Throughput, "throughput")
        parser.add_argument("--global_batch_size", type=int | None, default=None,
                            help="sequences per optimizer step over all devices; sets gradient accumulation")

    def instantiate_trainer(self, **kwargs):
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_accelerator(config.trainer)
        trainer = super().instantiate_trainer(**kwargs)
        replace_callback(trainer, trainer.progress_bar_callback, RichProgressBar, ProgressBar())
        for summary in [c for c in trainer.callbacks if type(c) in (ModelSummary, RichModelSummary)]:
            replace_callback(trainer, summary, type(summary), FlopsSummary(summary._max_depth))
        if self.subcommand in EVALUATIONS:  # which save nothing: restoring their state only warned of the folder
            trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, ModelCheckpoint)]
        if self.subcommand == "predict":
            trainer.callbacks.append(PredictionWriter())
        check_hardware(trainer, self.subcommand)
        if config.get("global_batch_size"):
            steps = accumulation_steps(config.global_batch_size, config.data.batch_size, trainer.world_size)
            asked = config.trainer.get("accumulate_grad_batches") or 1
            if asked not in (1, steps):  # (a run's saved config.yaml holds both, agreeing)
                raise ValueError(f"--global_batch_size={config.global_batch_size} means {steps} accumulated batches, "
                                 f"but trainer.accumulate_grad_batches is {asked}: set one of them, not both")
            # the saved config.yaml holds the same object: it records the accumulation that ran
            trainer.accumulate_grad_batches = config.trainer.accumulate_grad_batches = steps
            info("global batch %d = %d sequences x %d device%s x %d accumulated batches", config.global_batch_size,
                 config.data.batch_size, trainer.world_size, "s" * (trainer.world_size > 1),
                 trainer.accumulate_grad_batches)
        return trainer


def replace_callback(trainer, callback, kind: type, replacement) -> None:
    """Put `replacement` in the place of `callback` when it is exactly Lightning's `kind` (not a user's subclass)."""
    if type(callback) is kind:
        trainer.callbacks[trainer.callbacks.index(callback)] = replacement


def first_paragraph(component: object) -> str:
    return " ".join(inspect.cleandoc(component.__doc__ or "").split("\n\n")[0].split())


def started(trainer, subcommand: str) -> bool:
    """Whether a command made an optimizer step (fit) or evaluated a batch."""
    if subcommand == "fit":
        return trainer.global_step > 0
    loop = getattr(trainer, f"{subcommand}_loop")
    return loop.batch_progress.total.completed > 0


def checkpoint_arch(path: Path) -> dict:
    """The architecture a checkpoint's weights were trained with: an export's xlab.json, or a training
    checkpoint's `xlab` entry (written from the model itself, whatever the config said)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    return read_export_meta(path)["arch"] if path.is_dir() else read_checkpoint_file(path)["xlab"]["arch"]


def logger_args(config) -> Namespace | None:
    """The init_args of the configured logger when it is TensorBoard's or CSV (folders save_dir/name/version)."""
    logger = config.trainer.get("logger")
    if not isinstance(logger, Namespace) or "class_path" not in logger:
        return None
    module, _, name = logger.class_path.rpartition(".")
    kind = getattr(importlib.import_module(module), name)
    return logger.init_args if issubclass(kind, (TensorBoardLogger, CSVLogger)) else None


def latest_checkpoint(config) -> Path:
    """The most recently written `last.ckpt` of the runs under the logger's folder (`logs/version_*/checkpoints`)."""
    logger = config.trainer.get("logger")
    save_dir = logger.get("init_args", {}).get("save_dir") if hasattr(logger, "get") else None
    root = Path(save_dir or config.trainer.get("default_root_dir") or ".")
    found = sorted(root.glob("**/checkpoints/last.ckpt"), key=lambda path: path.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"--ckpt_path last: no run under {root}/ has a checkpoints/last.ckpt; "
                                "pass a checkpoint's path instead")
    return found[-1]


def accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise ValueError(f"global_batch_size={global_batch} is not a multiple of data.batch_size x devices = "
                         f"{micro_batch} x {world_size}: change one so that accumulation is a whole number")
    return global_batch // per_step


def check_accelerator(trainer_config) -> None:
    """Checked before the Trainer exists, whose own messages for the same ("No supported gpu backend found!", a
    TypeError) name no fix; DDP on a machine without GPUs runs `devices` CPU processes, and says so."""
    if torch.cuda.is_available():
        return
    accelerator, devices = trainer_config.get("accelerator"), trainer_config.get("devices")
    if accelerator in ("gpu", "cuda"):
        raise ValueError(f"trainer.accelerator is {accelerator} but this machine has no GPU: "
                         "use --trainer.accelerator=auto (or cpu)")
    if devices in (-1, "-1"):
        raise ValueError("trainer.devices is -1 (every GPU) but this machine has no GPU: "
                         "use --trainer.devices=N for N processes on the CPU")
    if "ddp" in str(trainer_config.get("strategy")):
        processes = 1 if devices == "auto" else devices
        info("DDP on the CPU: %s process%s per node (set the number with --trainer.devices=N)", processes,
             "es" * (str(processes) != "1"))


def check_hardware(trainer, subcommand: str | None = None) -> None:
    """Combinations that cannot work fail here, before any data is prepared."""
    if isinstance(trainer.strategy, FSDPStrategy):
        raise ValueError("strategy FSDPStrategy (FSDP v1) flattens the weights, which turns weight decay off and "
                         "breaks gradient clipping and sampling: shard with -c conf/extra/fsdp.yaml (FSDP2) instead")
    if subcommand == "predict" and isinstance(trainer.strategy, ModelParallelStrategy):
        raise ValueError("predict cannot run sharded (each process generates for its own prompts, and every forward "
                         "pass of a sharded model needs all of them): use --trainer.strategy=ddp, which reads the "
                         "same checkpoint")
    device = trainer.strategy.root_device
    precision = str(trainer.precision)
    if device.type == "cuda" and precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision {precision} needs a GPU with bfloat16 support; use 16-mixed or 32")


def not_a_tip(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("💡 Tip:")


def quiet_third_parties() -> None:
    """Lightning's advertising tips, and a deprecation inside Lightning's own code (torch's LeafSpec, used by
    lightning.pytorch.utilities._pytree), say nothing about the run."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(not_a_tip)  # once, however often called
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module="lightning.pytorch.utilities._pytree")
    # sharded: the logits (a reshaped view) are only read by the loss, never written in place, as the warning fears
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPTransformer\) returned a view tensor",
                            module="torch.distributed.fsdp._fully_shard._fsdp_state")
    # under DDP: val/test metrics are torchmetrics' results, synced across processes already (xlab.module)
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('(val|test)/",
                            module="lightning.pytorch.trainer.connectors.logger_connector.result")


def main(args: list[str] | None = None) -> None:
    # parse errors raise instead of printing the whole usage (hundreds of lines) before the message
    # a key must be spelt out: a prefix (--trainer.max_step) is an error, not the key it begins
    strict = {"exit_on_error": False, "allow_abbrev": False}
    defaults = {"default_config_files": [str(DEFAULTS)] if DEFAULTS.is_file() else [], **strict}
    quiet_third_parties()
    try:
        # auto_configure_optimizers off: the optimizer and schedule are the model's (model.optimizer, .schedule)
        XLabCLI(LanguageModel, XLabDataModule, args=args, auto_configure_optimizers=False,
                parser_kwargs={**strict, **{cmd: defaults for cmd in XLabCLI.subcommands()}},
                save_config_kwargs={"overwrite": True})
    except ArgumentError as err:
        detail = " ".join(line.strip() for line in str(err).strip().splitlines()[:3])  # key, then what is wrong
        command = next((a for a in (sys.argv[1:] if args is None else args) if a in XLabCLI.subcommands()), None)
        fail(f"{detail} (see ./xlab.py {command + ' ' if command else ''}--help)", BAD_INPUT)
    except (ValueError, OSError, CheckpointError, MisconfigurationException) as err:
        # configuration and input problems: one line that names the problem, no traceback
        fail(str(err), BAD_INPUT)
    except NonFiniteLoss as err:  # the run itself failed
        fail(str(err), 1)
    except SIGTERMException:
        # preempted (last.ckpt saved): exit as a process ended by SIGTERM does, so that schedulers restart the job
        raise SIGTERMException(128 + signal.SIGTERM) from None


BAD_INPUT = 2  # the exit status of every bad-input error, as argparse's and infer.py's and manage.py's


class Failed(SystemExit):
    """Ends the process with `status` after printing `error: message` (its str) to stderr, one line."""

    def __init__(self, message: str, status: int):
        super().__init__(status)
        self.message = f"error: {message}"

    def __str__(self) -> str:
        return self.message


def fail(message: str, status: int) -> None:
    failed = Failed(message, status)
    print(failed, file=sys.stderr)
    raise failed from None
