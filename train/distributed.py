"""Processes, sharding and optimizers: what TorchRec needs around the model.

One process by default (a world of one, with an in-memory store), or the world that
`torchrun` describes in the environment; gloo carries CPU tensors, NCCL CUDA ones.
`DistributedModelParallel` shards the tables by TorchRec's planner, which picks among
table-, row- and column-wise sharding unless `--sharding` names one; FBGEMM updates the
tables inside the backward pass with a fused optimizer, a torch optimizer updates the
dense part, and one `CombinedOptimizer` holds both states under the parameters' names.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import psutil
import torch
import torch.distributed as dist
from torch import nn

from train.tables import rowwise_lr_factor, stored_width

# TorchRec's deprecation notices (ShardedTensor's among them) and torch.fx's note on its
# tracing check speak of TorchRec's internals, not of anything a `mlet train` user can change.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torchrec\.")
warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)

SHARDINGS = ("table", "row", "column")
# --optimizer: the tables' fused FBGEMM update; the dense part takes the torch optimizer
# of the same family. rwsadagrad is DLRM's exact row-wise Adagrad: one float of state a row.
OPTIMIZERS = ("rwsadagrad", "adagrad", "sgd", "adam")
# Adagrad's epsilon as torch's and DLRM's rwsadagrad have it. FBGEMM's default of 1e-8 is
# not negligible here: a table row's gradient under a batch-mean loss is often below 1e-6,
# and with 1e-8 the first steps of such rows shrink (by a fifth for a gradient of 4e-8).
ADAGRAD_EPS = 1e-10


@dataclass(frozen=True)
class Processes:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    if device == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(device)


def start_processes(device: str = "auto") -> Processes:
    """Join torchrun's world, or make a world of one; idempotent within a process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    resolved = resolve_device(device, local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        # gloo for CPU tensors and, where CUDA is, NCCL for CUDA ones: one world serves
        # a process that trains on either device (the tests, the study) in turn
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if world > 1:
            dist.init_process_group(backend)  # torchrun's MASTER_ADDR, MASTER_PORT
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Processes(rank, dist.get_world_size(), local_rank, local_world, resolved)


def table_optimizer(name: str, device: torch.device):
    """The class `apply_optimizer_in_backward` maps to FBGEMM's fused update."""
    import torchrec.optim

    if name == "adam" and device.type != "cuda":
        raise ValueError(
            "--optimizer adam needs CUDA: FBGEMM's CPU kernels have no fused Adam "
            "(rwsadagrad, adagrad and sgd run on CPU)"
        )
    return {
        "rwsadagrad": torchrec.optim.RowWiseAdagrad,
        "adagrad": torch.optim.Adagrad,
        "sgd": torch.optim.SGD,
        "adam": torch.optim.Adam,
    }[name]


def table_optimizer_options(name: str, lr: float) -> dict:
    """The fused update's hyper-parameters: the learning rate, and Adagrad's epsilon."""
    return {"lr": lr, "eps": ADAGRAD_EPS} if "adagrad" in name else {"lr": lr}


def dense_optimizer(name: str, lr: float, device: torch.device):
    """A factory for the dense parameters' torch optimizer, of the tables' family.

    torch's fused kernel where it has one for the device (Adagrad's is CPU only): a step
    of a few small tensors costs launch overhead more than arithmetic, and the fused
    step took half the time of the per-tensor loop for DLRM's MLPs on this CPU.
    """
    kind = {
        "rwsadagrad": torch.optim.Adagrad,
        "adagrad": torch.optim.Adagrad,
        "sgd": torch.optim.SGD,
        "adam": torch.optim.Adam,
    }[name]
    fused = device.type == "cpu" or kind is not torch.optim.Adagrad
    return lambda params: kind(params, lr=lr, fused=fused)


def topology(processes: Processes):
    from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig

    memory = psutil.virtual_memory().total // processes.local_world
    hbm = None
    if processes.device.type == "cuda":
        hbm = torch.cuda.get_device_properties(processes.device).total_memory
    return TopologyFactory.create_topology(
        trainer_config=TrainerConfig(
            world_size=processes.world,
            local_world_size=processes.local_world,
            ddr_cap_bytes=memory,
            hbm_cap_bytes=hbm,
        ),
        kernel_config=KernelConfig(compute_device=processes.device.type),
    )


def sharding_kinds(
    sharding: str | None, widths: list[int], device: torch.device, world: int
) -> list[str]:
    """TorchRec sharding types to offer the planner; a clear error for one that cannot be.

    Tables never go data-parallel: a replicated table would take dense gradients as large
    as the table, and the fused optimizers update sharded tables only. One process holds
    every table whole, table-wise; several let the planner choose.
    """
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    offered = set(EmbeddingBagCollectionSharder().sharding_types(device.type))
    # FBGEMM's kernels need each column shard's width to be a multiple of 4 too
    column_ok = all(width % 8 == 0 for width in widths)
    if sharding is None:
        if world == 1:
            return ["table_wise"]
        kinds = [f"{s}_wise" for s in SHARDINGS if f"{s}_wise" in offered]
        return [k for k in kinds if k != "column_wise" or column_ok]
    kind = f"{sharding}_wise"
    if kind not in offered:
        raise ValueError(f"--sharding {sharding}: TorchRec does not shard {kind} on {device.type}")
    if kind == "column_wise" and not column_ok:
        raise ValueError(
            f"--sharding column needs tables at least 8 wide, in multiples of 8 (FBGEMM's "
            f"kernels take shards in multiples of 4), got {sorted(set(widths))}"
        )
    return [kind]


def sharding_plan(
    model: nn.Module,
    tables,
    sharding: str | None,
    processes: Processes,
    fixed: dict[str, str] | None = None,
):
    """TorchRec's plan for the tables: the planner's choice, or every table `sharding`-wise.

    `fixed` (table -> sharding type) repeats an earlier plan, as a resumed run must.
    """
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints

    widths = [stored_width(t) for t in tables.configs]
    kinds = sharding_kinds(sharding, widths, processes.device, processes.world)
    constraints = {
        name: ParameterConstraints(
            sharding_types=[fixed[name]] if fixed else kinds, compute_kernels=["fused"]
        )
        for name in tables.names
    }
    planner = EmbeddingShardingPlanner(topology=topology(processes), constraints=constraints)
    with quiet_torchrec():
        try:
            return planner.collective_plan(
                model, [EmbeddingBagCollectionSharder()], dist.GroupMember.WORLD
            )
        except Exception as error:  # the planner raises PlannerError or RuntimeError
            wanted = f"--sharding {sharding}" if sharding else " or ".join(kinds)
            raise ValueError(
                f"the tables cannot be sharded {wanted} over {processes.world} "
                f"{processes.device.type} process(es): {first_line(error)}"
            ) from error


def first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


class quiet_torchrec:
    """TorchRec's planner logs pages of estimates at WARNING; keep them for errors."""

    def __enter__(self):
        self.logger = logging.getLogger("torchrec")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def shard_model(model: nn.Module, tables, config, processes: Processes, fixed_plan=None):
    """The model under `DistributedModelParallel`, and its combined optimizer.

    `tables` is the model's `train.tables.TorchRecTables`; `config` a `TrainConfig`;
    `fixed_plan` the sharding types of an earlier run to repeat.
    """
    from torchrec.distributed import DistributedModelParallel
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    table_lr = config.embedding_lr or config.lr
    if config.optimizer == "rwsadagrad":
        table_lr *= rowwise_lr_factor(tables.configs)
    apply_optimizer_in_backward(
        table_optimizer(config.optimizer, processes.device),
        tables.bags.parameters(),
        table_optimizer_options(config.optimizer, table_lr),
    )
    plan = sharding_plan(model, tables, config.sharding, processes, fixed_plan)
    with quiet_torchrec():
        # one process has nothing to average: no DDP around the dense part then
        sharded = DistributedModelParallel(
            model, device=processes.device, plan=plan, init_data_parallel=processes.world > 1
        )
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(sharded.named_parameters())),
        dense_optimizer(config.optimizer, config.lr, processes.device),
    )
    optimizer = CombinedOptimizer([sharded.fused_optimizer, dense])
    return sharded, optimizer, plan
