"""Fully sharded data parallel training with PyTorch's FSDP2 (`fully_shard`), through Lightning's
`ModelParallelStrategy`: `conf/extra/fsdp.yaml` selects `FSDP2Strategy`, and `LanguageModel.configure_model`
shards the model with `shard`. Parameters keep their shapes as DTensors, so parameter groups, gradient norms
and FLOP counts see the whole model.
"""

from __future__ import annotations

from datetime import timedelta

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from xlab.transformer import Transformer


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every process: each is one data-parallel replica (ModelParallelStrategy's default would make a
    node's processes one tensor-parallel group, all fed the same batches), and checkpoints are one consolidated
    file, which `xlab.checkpoint.load_checkpoint`, infer.py and manage.py read, rather than a folder of shards."""

    def __init__(self, process_group_backend: str | None = None, timeout: timedelta | None = default_pg_timeout):
        super().__init__(tensor_parallel_size=1, save_distributed_checkpoint=False,
                         process_group_backend=process_group_backend, timeout=timeout)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.world_size  # known once the devices are, after __init__
        super().setup_environment()


def shard(model: Transformer, mesh: DeviceMesh, precision: str) -> None:
    """Shard `model` in place over the 1-D `mesh`: each block is one unit of all-gather (forward, backward) and
    reduce-scatter (gradients); the root holds the rest (embeddings, final norm, head). Under bf16-mixed the
    weights are gathered and used in bfloat16 and gradients reduced in float32; the sharded weights and the
    optimizer state stay float32."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16-mixed" else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def full_copy(model: Transformer, device: torch.device) -> Transformer | None:
    """An unsharded copy of a sharded `model` on `device` on rank 0 (None elsewhere), in eval mode. Every rank
    must call it: the weights are all-gathered, one at a time, to rank 0's CPU memory."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if torch.distributed.get_rank() != 0:
        return None
    copy = Transformer(model.config)
    copy.load_state_dict(state)
    return copy.to(device).eval()
