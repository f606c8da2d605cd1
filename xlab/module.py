"""The LightningModule: next-token training of `Transformer`, its metrics and its checkpoints."""

from __future__ import annotations

import inspect
import logging
import math
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass, replace
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torchmetrics import SumMetric
from torchmetrics.classification import MulticlassAccuracy

from xlab import loops
from xlab.checkpoint import load_checkpoint
from xlab.fsdp import full_copy, shard
from xlab.generate import GenerationConfig, generate
from xlab.kernels import OneDNNWeights
from xlab.loss import IGNORE_INDEX, linear_cross_entropy, next_token_loss, target_losses
from xlab.optim import ROLES, Combined, GroupLR, Muon, MuonConfig, Schedule, label, param_groups
from xlab.resume import Resume
from xlab.transformer import Transformer, TransformerConfig

log = logging.getLogger(__name__)


# `attention_backends`' names for torch.nn.attention.SDPBackend
ATTENTION_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                      "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}

# what scaled_dot_product_attention raises when none of the allowed backends fits: on CUDA (after a warning per
# backend saying why), and on the CPU
NO_SDPA_KERNEL = ("No available kernel", "No viable backend for scaled_dot_product_attention")

OPTIMIZERS = ("adamw", "muon")  # model.optimizer's names; a torch.optim class is given by class_path


def sdpa_backends(names: list[str] | None) -> list[SDPBackend] | None:
    """The SDPA backends `names` stand for (None: PyTorch's own choice)."""
    if names is None:
        return None
    unknown = [name for name in names if name not in ATTENTION_BACKENDS]
    if unknown or not names:
        raise ValueError(f"attention_backends {names}: unknown {unknown or 'empty list'}; choose among "
                         f"{', '.join(ATTENTION_BACKENDS)}")
    return [ATTENTION_BACKENDS[name] for name in names]


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf: training stops and the last good checkpoint is kept."""


@contextmanager
def eager(model: torch.nn.Module):
    """Run a `compile()`d module eagerly: generation changes shapes every step, which would
    recompile the training graph again and again."""
    compiled, model._compiled_call_impl = model._compiled_call_impl, None
    try:
        yield model
    finally:
        model._compiled_call_impl = compiled


class LanguageModel(L.LightningModule):
    """Trains a `Transformer` on (inputs, targets) batches of token ids, each (B, T).

    generation: how `predict` continues its prompts (eos/bos/pad ids come from the tokenizer).
    optimizer: `adamw` (the default: AdamW with `learning_rate`, `weight_decay`, `betas`, fused on CUDA), `muon`
    (Muon on the blocks' matrices with the settings of `muon`, AdamW on the rest), or any `torch.optim` class from
    YAML (`class_path` + `init_args`). Weight decay applies to matrices only; `group_lr` sets the learning rates of
    the embeddings, the head and the other parameters (see `xlab.optim.param_groups`).
    loss_chunk_size: 0, the cross-entropy of the full logits (B, T, V); N > 0, `xlab.loss.linear_cross_entropy`
    over N tokens at a time, which never holds more than (N, V) logits. Not with FSDP yet.
    attention_backends: the SDPA kernels training and evaluation may use (`flash`, `cudnn`, `efficient`, `math`);
    None, PyTorch's choice. Generation keeps PyTorch's choice.
    """

    def __init__(self, arch: TransformerConfig = TransformerConfig(), learning_rate: float = 1e-3,
                 weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                 decay_embeddings: bool = False, optimizer: Literal["adamw", "muon"] | OptimizerCallable = "adamw",
                 muon: MuonConfig = MuonConfig(), group_lr: GroupLR = GroupLR(), schedule: Schedule = Schedule(),
                 compile: bool = False, init_from: str | None = None,
                 sample_prompts: list[str] | None = None, sample_tokens: int = 64,
                 generation: GenerationConfig = GenerationConfig(strategy="greedy", max_new_tokens=64),
                 loss_chunk_size: int = 0, attention_backends: list[str] | None = None):
        super().__init__()
        if isinstance(optimizer, str) and optimizer not in OPTIMIZERS:
            raise ValueError(f"model.optimizer {optimizer!r}: choose {' or '.join(OPTIMIZERS)}, or give a torch.optim "
                             "class (class_path and init_args)")
        if loss_chunk_size < 0:
            raise ValueError(f"loss_chunk_size must be 0 (the full logits) or positive, got {loss_chunk_size}")
        self.attention_backends = sdpa_backends(attention_backends)
        model = self.initial_model(arch, init_from)
        arch = model.config  # what save_hyperparameters records: the architecture trained, init_from's if given
        self.save_hyperparameters(ignore=["optimizer"])
        if "_instantiator" not in self.hparams:
            # built in Python, not by the CLI: store the dataclasses as the plain dicts the CLI stores (a pickled
            # dataclass fails weights_only loading) and name the CLI's instantiator, which load_from_checkpoint
            # uses to turn them back into dataclasses
            self.hparams.update({k: asdict(v) for k, v in self.hparams.items() if is_dataclass(v)},
                                _instantiator="lightning.pytorch.cli.instantiate_module")
        self.model = model
        self.features_fn = model.features  # what the chunked loss runs the model with: not its forward
        self.chunked_loss_fn = linear_cross_entropy
        self.loss_fn = next_token_loss
        self.eval_loss_fn = target_losses
        self.optimizer_factory = optimizer
        self.muon, self.group_lr = muon, group_lr
        self.schedule = schedule
        self.generation = generation
        self.resume = Resume()  # what the run has consumed; see configure_callbacks
        self._step_sums: torch.Tensor | None = None  # see log_training
        self.onednn_weights: OneDNNWeights | None = None  # during an evaluation: its oneDNN copies of the weights
        self.first_bad: tuple[torch.Tensor, torch.Tensor] | None = None  # see note_non_finite
        vocab = self.model.config.vocab_size
        # sums over the whole evaluation, synced across ranks by compute(): the loss is nats / targets and bits per
        # byte nats / ln 2 / bytes, both token-weighted. NaNs are kept (nan_strategy "warn" would drop them, and
        # checking for them would wait for the device every batch)
        self.metrics = torch.nn.ModuleDict({
            f"{stage}_{name}": metric for stage in ("val", "test") for name, metric in (
                ("nats", SumMetric(nan_strategy="disable")), ("targets", SumMetric(nan_strategy="disable")),
                ("bytes", SumMetric(nan_strategy="disable")),
                ("acc", MulticlassAccuracy(vocab, average="micro", ignore_index=IGNORE_INDEX)))})
        # UTF-8 bytes of the text each token id stands for (special tokens 0), from the datamodule's tokenizer in
        # setup(): None without one, and then no bits per byte. Not persistent: checkpoints stay as they were
        self.register_buffer("token_bytes", None, persistent=False)

    @staticmethod
    def initial_model(arch: TransformerConfig, init_from: str | None) -> Transformer:
        """A fresh model, or the weights of a checkpoint (full or exported) to fine-tune from;
        the checkpoint's architecture wins, since its weights only fit that one."""
        if init_from is None:
            return Transformer(arch)
        model = load_checkpoint(init_from).model.train()
        # compared as resolved (kv_heads, ff_dim), so that None and the value it stands for agree
        ours, theirs = (asdict(c) | {"n_kv_heads": c.kv_heads, "d_ff": c.ff_dim} for c in (arch, model.config))
        if ours != theirs:
            changed = {k for k, v in theirs.items() if ours[k] != v}
            log.warning("init_from %s: using its architecture, which differs from the config in %s",
                        init_from, sorted(changed))
        return model

    def setup(self, stage: str) -> None:
        tokenizer = getattr(getattr(self.trainer, "datamodule", None), "tokenizer", None)
        vocab = self.model.config.vocab_size
        if tokenizer is not None and tokenizer.vocab_size > vocab:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary only "
                             f"{vocab}: use the tokenizer the model was trained with")
        # ids past the tokenizer's (a vocabulary padded for speed) are never targets: 0 bytes
        self.token_bytes = None if tokenizer is None else torch.tensor(
            tokenizer.token_bytes() + [0] * (vocab - tokenizer.vocab_size), device=self.device)

    def configure_model(self) -> None:
        # a device mesh comes with ModelParallelStrategy (conf/extra/fsdp.yaml); the hook runs once per stage
        if self.device_mesh is not None and self.hparams.loss_chunk_size:
            # FSDP2 gathers the root's weights (embeddings, head) in the model's forward hooks, which
            # `features` and a loss reading lm_head.weight directly would bypass
            raise ValueError("loss_chunk_size is not supported with FSDP yet: set model.loss_chunk_size=0")
        if self.device_mesh is not None and self.optimizer_factory == "muon":
            # each rank holds a shard of every matrix: Muon would orthogonalise the shards, not the matrices
            raise ValueError("model.optimizer=muon is not supported with FSDP2 (it would orthogonalise each rank's "
                             "shard of a matrix): train with DDP (-c conf/extra/ddp.yaml) or model.optimizer=adamw")
        if self.device_mesh is not None and not isinstance(self.model, FSDPModule):
            shard(self.model, self.device_mesh["data_parallel"], str(self.trainer.precision))
        if self.hparams.compile:
            if self.attention_backends is not None:
                # the on-disk compile caches do not key on the SDPA backends (pytorch/pytorch#185449): a graph
                # compiled under others would be reused, silently measuring the wrong kernel
                torch.compiler.config.force_disable_caches = True
            self.model.compile()  # in place: parameter names, and so checkpoints, stay the same
            # compiled, the loss reads the logits once instead of materialising a float32 copy
            self.loss_fn = torch.compile(next_token_loss)
            self.eval_loss_fn = torch.compile(target_losses)
            self.features_fn = torch.compile(self.model.features)
            self.chunked_loss_fn = torch.compile(linear_cross_entropy)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    @contextmanager
    def attention(self):
        """Run the model's attention on `attention_backends`, naming them if none of them can."""
        if self.attention_backends is None:
            yield
            return
        try:
            # torch.compile picks the kernel when it traces, which happens in here too: the choice holds compiled
            with sdpa_kernel(self.attention_backends):
                yield
        except RuntimeError as err:  # compiled, Dynamo's error quotes PyTorch's
            if not any(message in str(err) for message in NO_SDPA_KERNEL):
                raise
            names = [name for name, backend in ATTENTION_BACKENDS.items() if backend in self.attention_backends]
            raise ValueError(f"attention_backends {names}: none of them can run this model's attention on "
                             f"{self.device.type} (PyTorch's warnings, if any, say why); allow another or leave "
                             "it unset") from err

    def step(self, batch: tuple[torch.Tensor, torch.Tensor], per_token: bool = False,
             predict: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The cross-entropy of a batch (x, y), each (B, T): its mean over non-ignored targets, or per_token each
        target's (B * T,), 0 at IGNORE_INDEX; and, with predict, each position's argmax prediction (B * T,).

        Under DDP this still runs inside the wrapped module's forward (Lightning routes training_step through
        it), so calling the model's `features` rather than its forward keeps DDP's gradient hooks."""
        x, y = batch
        if self.hparams.loss_chunk_size:
            with self.attention():
                features = self.features_fn(x)
            out = self.chunked_loss_fn(features.flatten(0, 1), self.model.lm_head.weight, y.flatten(),
                                       self.model.config.vocab_size, self.hparams.loss_chunk_size,
                                       "none" if per_token else "mean", predict, self.model.config.logit_softcap)
            return out if predict else (out, None)
        with self.attention():
            logits = self.model(x)
        loss = (self.eval_loss_fn if per_token else self.loss_fn)(logits, y)
        return loss, logits.detach().argmax(-1).flatten() if predict else None

    def configure_callbacks(self) -> list[L.Callback]:
        return [self.resume]  # with any Trainer: exact resumes, the counters in checkpoints, a save on SIGTERM

    def training_step(self, batch, batch_idx):
        logging_step = loops.is_logging_step(self.trainer)
        loss, predictions = self.step(batch, predict=logging_step)  # accuracy only when it is logged
        self.note_non_finite(loss)
        # reading the note waits for the device, so on a GPU only at logging steps (and before every checkpoint)
        if not self.waits_for_device() or logging_step:
            self.check_finite()
        self.log_training(loss, predictions, batch[1])
        return loss

    def log_training(self, loss: torch.Tensor, predictions: torch.Tensor | None, targets: torch.Tensor) -> None:
        """Log `train/loss` once per optimizer step: the mean of its micro-batches' losses over every rank, the
        objective the step's gradient averages. At logging steps, also its perplexity, `train/accuracy` over all the
        step's targets (every rank). Sums gather over the step's micro-batches (B, T)
        without waiting for the device; the ranks' sums are added once, at the step's last micro-batch."""
        correct = kept = torch.zeros((), device=loss.device)
        if predictions is not None:  # (B * T,)
            mask = targets.flatten() != IGNORE_INDEX
            correct, kept = ((predictions == targets.flatten()) & mask).sum(), mask.sum()
        sums = torch.stack([loss.detach().float(), torch.ones_like(loss, dtype=torch.float), correct, kept]).float()
        self._step_sums = sums if self._step_sums is None else self._step_sums + sums
        if loops.has_micro_batches_to_come(self.trainer):
            return
        losses, micro_batches, correct, kept = self.trainer.strategy.reduce(self._step_sums, reduce_op="sum")
        self._step_sums = None
        mean = losses / micro_batches
        self.log("train/loss", mean)
        if predictions is not None:
            self.log_dict({"train/perplexity": mean.exp(), "train/accuracy": correct / kept})

    def on_validation_epoch_start(self) -> None:
        self.onednn_weights = OneDNNWeights()  # the weights are fixed for one evaluation: laid out once for it

    on_test_epoch_start = on_validation_epoch_start

    def evaluate(self, batch, stage: str) -> None:
        """Add a batch to the stage's sums: one cross-entropy pass gives both the loss and bits per byte."""
        y = batch[1]
        with self.onednn_weights or OneDNNWeights():  # called outside an evaluation: a scope of its own
            losses, predictions = self.step(batch, per_token=True, predict=True)
        kept = y != IGNORE_INDEX
        self.metrics[f"{stage}_nats"].update(losses.sum())  # ignored targets add 0
        self.metrics[f"{stage}_targets"].update(kept.sum())
        if self.token_bytes is not None:  # an ignored target's -100 would index the table from its end: masked
            self.metrics[f"{stage}_bytes"].update((self.token_bytes[y.clamp(min=0)] * kept).sum())
        self.metrics[f"{stage}_acc"].update(predictions, y.flatten())

    def validation_step(self, batch, batch_idx):
        self.evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self.evaluate(batch, "test")

    def evaluation(self, stage: str) -> dict[str, torch.Tensor]:
        """The stage's figures over the whole evaluation so far (all ranks): the token-weighted loss (nats per target),
        its perplexity, accuracy, and, with a tokenizer, bits per byte: every target's loss, end-of-document's
        included, over the UTF-8 bytes of the text the targets stand for (special tokens 0)."""
        nats, targets, accuracy = (self.metrics[f"{stage}_{name}"].compute() for name in ("nats", "targets", "acc"))
        figures = {"loss": nats / targets, "perplexity": (nats / targets).exp(), "accuracy": accuracy}
        if self.token_bytes is not None:
            figures["bpb"] = nats / math.log(2) / self.metrics[f"{stage}_bytes"].compute()
        return figures

    def log_evaluation(self, stage: str) -> None:
        self.onednn_weights = None  # their copies go: training changes the weights next
        figures = self.evaluation(stage)
        self.log(f"{stage}/loss", figures.pop("loss"), prog_bar=stage == "val")
        self.log_dict({f"{stage}/{name}": value for name, value in figures.items()})
        for name, metric in self.metrics.items():
            if name.startswith(f"{stage}_"):
                metric.reset()

    def on_validation_epoch_end(self) -> None:
        self.log_evaluation("val")
        if self.hparams.sample_prompts and not self.trainer.sanity_checking:
            # a sharded forward pass needs every rank, and only rank 0 samples: it does so from a full copy
            model = full_copy(self.model, self.device) if isinstance(self.model, FSDPModule) else self.model
            if self.global_rank == 0:
                self.log_samples(model)

    def log_samples(self, model: Transformer) -> None:
        """Continue the fixed `sample_prompts` with `model` (seeded sampling) and log them as TensorBoard text."""
        tokenizer = self.trainer.datamodule.tokenizer
        prompts = [tokenizer.encode_prompt(p) for p in self.hparams.sample_prompts]
        room = model.config.context - max(map(len, prompts))
        config = GenerationConfig(strategy="sample", max_new_tokens=max(1, min(self.hparams.sample_tokens, room)),
                                  temperature=0.8, top_k=50, eos_id=tokenizer.eos_id, bos_id=tokenizer.start_id,
                                  compile=False)  # a few short samples: compiling the decoding step would not pay
        generator = torch.Generator(self.device).manual_seed(0)
        with eager(model):
            completions = generate(model, prompts, config, generator)
        text = "\n\n".join(f"**{p!r}** → `{tokenizer.decode(c.tokens)!r}`"
                             for p, [c] in zip(self.hparams.sample_prompts, completions, strict=True))
        for logger in self.loggers:
            if hasattr(logger.experiment, "add_text"):
                logger.experiment.add_text("samples", text, self.global_step)

    def predict_step(self, batch: dict[str, list], batch_idx: int) -> list[dict]:
        """Continue each prompt of a `{"text": [str], "ids": [LongTensor]}` batch: one dict per prompt with its
        completions (a list: `generation.num_return_sequences` of them). Each prompt's ids start a document, as
        `Tokenizer.encode_prompt` gives them on every path. Sampling is seeded by the batch index."""
        tokenizer = self.trainer.datamodule.tokenizer
        config = replace(self.generation, eos_id=tokenizer.eos_id, bos_id=tokenizer.start_id,
                         pad_id=tokenizer.pad_id)
        prompts = [tokenizer.encode_prompt(ids.tolist()) for ids in batch["ids"]]
        generator = torch.Generator(self.device).manual_seed(batch_idx)
        with eager(self.model):
            completions = generate(self.model, prompts, config, generator)
        return [{"prompt": text, "completions": [tokenizer.decode(c.tokens) for c in options]}
                for text, options in zip(batch["text"], completions, strict=True)]

    def on_test_epoch_end(self) -> None:
        self.log_evaluation("test")

    def on_before_optimizer_step(self, optimizer) -> None:
        if loops.is_logging_step(self.trainer):
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads)
            # sharded (FSDP2), the gradients are DTensors and their norm a DTensor holding the global value
            self.log("train/grad_norm", norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning's mixed-precision plugin refuses to clip for fused optimizers even under bf16,
        # which has no gradient scaler: the gradients are already unscaled, so clip them directly
        if gradient_clip_val and getattr(self.trainer.precision_plugin, "scaler", 1) is None:
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val, foreach=True)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        optimizer = self.build_optimizer()
        label(optimizer)
        total = self.schedule.total_steps or (
            self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.schedule(step, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def build_optimizer(self) -> torch.optim.Optimizer:
        """`model.optimizer` over `xlab.optim.param_groups`."""
        h = self.hparams

        def groups(roles: tuple[str, ...], weight_decay: float | None = h.weight_decay) -> list[dict]:
            return param_groups(self.model, weight_decay, h.decay_embeddings, self.group_lr, roles)

        # fused AdamW unscales inside its step, which float16's grad scaler cannot follow
        fused = self.device.type == "cuda" and not str(self.trainer.precision).startswith("16")
        if self.optimizer_factory == "adamw":
            return torch.optim.AdamW(groups(ROLES), lr=h.learning_rate, betas=h.betas, fused=fused)
        if self.optimizer_factory == "muon":
            hidden, rest = groups(ROLES[:1], weight_decay=None), groups(ROLES[1:])  # Muon's own decay
            return Combined(Muon(hidden, **self.muon.options(h.learning_rate, h.weight_decay)),
                            torch.optim.AdamW(rest, lr=h.learning_rate, betas=h.betas, fused=fused))
        # the decayed groups take the optimizer's own weight decay
        chosen = groups(ROLES, weight_decay=None)
        given = [set(group) for group in chosen]
        optimizer = self.optimizer_factory(chosen)
        # an lr or weight_decay still at the optimizer's default was not set by its init_args: ours then
        own = inspect.signature(type(optimizer)).parameters
        for key, value in (("lr", h.learning_rate), ("weight_decay", h.weight_decay)):
            if key in own and optimizer.defaults.get(key) == own[key].default:
                for group, keys in zip(optimizer.param_groups, given, strict=True):
                    if key not in keys:
                        group[key] = value
        return optimizer

    def waits_for_device(self) -> bool:
        """Whether reading a value computed here waits for the device's queue (a GPU, not the CPU)."""
        return self.device.type != "cpu"

    def note_non_finite(self, loss: torch.Tensor) -> None:
        """Keep the step and value of the first non-finite loss (scalar tensors), without waiting for the device."""
        if self.first_bad is None:
            self.first_bad = (torch.full((), -1, device=loss.device), torch.zeros((), device=loss.device))
        step, value = self.first_bad
        first = ~torch.isfinite(loss.detach()) & (step < 0)
        self.first_bad = (torch.where(first, self.global_step, step), torch.where(first, loss.detach().float(), value))

    def check_finite(self) -> None:
        """Stop, naming the step, if a loss noted since the start was NaN or inf."""
        if self.first_bad is not None and self.first_bad[0] >= 0:
            step, value = (t.item() for t in self.first_bad)
            self.stop_non_finite(f"loss is {value}", step)

    def stop_non_finite(self, what: str, step: int | None = None) -> None:
        raise NonFiniteLoss(f"{what} at step {self.global_step if step is None else step}: stopping; the checkpoints "
                            "written so far are kept (try a lower learning rate or gradient clipping)")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store what `xlab.checkpoint.load_checkpoint` needs to rebuild the model without Lightning.
        Weights that are no longer finite are never saved."""
        self.check_finite()  # a NaN loss since the last logging step: name its step rather than the weights'
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            self.stop_non_finite("weights are NaN or inf")
        datamodule = getattr(self.trainer, "datamodule", None)
        tokenizer = getattr(datamodule, "tokenizer", None)
        best = getattr(self.trainer.checkpoint_callback, "best_model_score", None)
        checkpoint.setdefault("xlab", {}).update({  # beside what `xlab.resume` wrote: the run's counters
            "arch": asdict(self.model.config),
            "tokenizer": tokenizer.to_str() if tokenizer is not None else None,
            "tokenizer_path": str(getattr(datamodule, "tokenizer_path", "")),
            "data_fingerprint": datamodule.fingerprint() if datamodule is not None else None,
            "step": self.global_step,
            "val_loss": float(best) if best is not None else None,
        })
