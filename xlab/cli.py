"""The `xlab.py` command line: LightningCLI over `LanguageModel` and `XLabDataModule`.

Configs layer as code defaults < conf/defaults.yaml < each `-c FILE` < command-line flags.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningCLI, _get_short_description
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from xlab.callbacks import PredictionWriter, PreemptionCheckpoint, ProgressBar, Throughput
from xlab.checkpoint import EXPORT_TOKENIZER, CheckpointError, read_checkpoint_file, read_export_meta
from xlab.data import XLabDataModule
from xlab.module import LanguageModel, NonFiniteLoss
from xlab.tokenizer import Tokenizer

DEFAULTS = Path(__file__).resolve().parent.parent / "conf" / "defaults.yaml"


DATA_COMMANDS = ("prepare_data", "train_tokenizer", "compute_stats")  # XLabDataModule methods, no trainer needed


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
            sub_kwargs = {"description": _get_short_description(getattr(klass, name)), **kwargs.get(name, {})}
            self._subcommand_parsers[name] = self._prepare_subcommand_parser(klass, name, **sub_kwargs)
            subcommands.add_subcommand(name, self._subcommand_parsers[name], help=sub_kwargs["description"])

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand in DATA_COMMANDS:
            getattr(self.datamodule, subcommand)()
        else:
            super()._run_subcommand(subcommand)

    def _parse_ckpt_path(self) -> None:
        """Lightning applies all of a checkpoint's hyperparameters over the config. Only the architecture must
        come from the checkpoint (its weights fit no other); the rest (generation, optimiser, schedule) stays
        as the config and command line give it, so `predict --model.generation...` does what it says.
        Evaluation also takes the checkpoint's tokenizer and checks its data (`XLabDataModule.use_checkpoint`)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path == "last":  # each run logs to a new version folder: "last" means the newest run's
            ckpt_path = self.config[subcommand].ckpt_path = str(latest_checkpoint(self.config[subcommand]))
        if ckpt_path and Path(ckpt_path).is_dir():
            self.use_export(subcommand, Path(ckpt_path))
        elif ckpt_path and Path(ckpt_path).is_file():
            ckpt = read_checkpoint_file(Path(ckpt_path))
            hparams, meta = ckpt.get("hyper_parameters", {}), ckpt["xlab"]
            if subcommand != "fit" and meta.get("tokenizer"):
                self.evaluated = Tokenizer.from_str(meta["tokenizer"]), meta.get("data_fingerprint")
            if "arch" in hparams:
                self.config = self.parser.parse_object({subcommand: {"model": {"arch": hparams["arch"]}}}, self.config)

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
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(PreemptionCheckpoint())
        if type(trainer.progress_bar_callback) is RichProgressBar:  # Lightning's default bar: ours instead
            bar = trainer.progress_bar_callback
            trainer.callbacks[trainer.callbacks.index(bar)] = ProgressBar()
        if self.subcommand == "predict":
            trainer.callbacks.append(PredictionWriter())
        check_hardware(trainer, self.subcommand)
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("global_batch_size"):
            trainer.accumulate_grad_batches = accumulation_steps(
                config.global_batch_size, config.data.batch_size, trainer.world_size)
        return trainer


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


def main(args: list[str] | None = None) -> None:
    # parse errors raise instead of printing the whole usage (hundreds of lines) before the message
    defaults = {"default_config_files": [str(DEFAULTS)] if DEFAULTS.is_file() else [], "exit_on_error": False}
    try:
        XLabCLI(LanguageModel, XLabDataModule, args=args,
                parser_kwargs={"exit_on_error": False, **{cmd: defaults for cmd in XLabCLI.subcommands()}},
                save_config_kwargs={"overwrite": True})
    except ArgumentError as err:
        detail = " ".join(line.strip() for line in str(err).strip().splitlines()[:3])  # key, then what is wrong
        sys.exit(f"error: {detail} (see ./xlab.py SUBCOMMAND --help)")
    except (ValueError, OSError, CheckpointError, MisconfigurationException, NonFiniteLoss) as err:
        # configuration and input problems: one line that names the problem, no traceback
        sys.exit(f"error: {err}")
