"""Training checkpoints with torch.distributed.checkpoint (DCP), renamed into place.

A checkpoint is a DCP folder holding the model's and both optimizers' tensors and each
process's random state, plus `trainer.json` (position in the data, early-stopping state,
history). It is written as `NAME.partial` and renamed; then
`checkpoints.json`, the pointer to the latest and the best checkpoint, is replaced
atomically, and only then are older folders removed. A kill at any moment leaves the
previous pointer and the folders it names intact.

Sharded tables enter DCP as row blocks of each process's own shards. FBGEMM keeps all
tables of a process in one buffer, so a table is a view into it, and DCP copies a view
before writing it; in blocks, that copy stays small. The blocks are keyed by rank, so a
checkpoint resumes on the same number of processes with the same sharding plan, which
`trainer.json` records and `load_checkpoint` checks.

DCP's metadata file is a pickle; it is read with an unpickler that accepts DCP's own
metadata classes and nothing else.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from mlet.files import read_json, write_json

POINTER = "checkpoints.json"
TRAINER_STATE = "trainer.json"
BLOCK_BYTES = 64 << 20
METADATA_CLASSES = {
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
}


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or not of this run."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = (
            module == "torch.distributed.checkpoint.metadata"
            or (module, name) in METADATA_CLASSES
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise CheckpointError(f"checkpoint metadata refers to {module}.{name}")
        return super().find_class(module, name)


class MetadataCheckedReader(FileSystemReader):
    """DCP's file reader, with its metadata pickle limited to DCP's metadata classes."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as stream:
                metadata = _MetadataUnpickler(stream).load()
        except (OSError, EOFError, pickle.UnpicklingError) as error:
            raise CheckpointError(f"{self.path}: unreadable DCP metadata ({error})") from error
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{self.path}: the DCP metadata is not a Metadata record")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def tensor_entries(state: dict, prefix: str, rank: int) -> dict[str, torch.Tensor]:
    """The tensors of a nested state dict under flat DCP keys; shards as row blocks."""
    entries: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            entries.update(tensor_entries(value, name, rank))
        elif isinstance(value, ShardedTensor):
            for index, shard in enumerate(value.local_shards()):
                entries.update(row_blocks(shard.tensor, f"{name}/rank{rank}/shard{index}"))
        elif isinstance(value, torch.Tensor):
            entries[name] = value
    return entries


def row_blocks(tensor: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    row_bytes = max(1, tensor[0].nbytes) if tensor.dim() and len(tensor) else 1
    rows = max(1, BLOCK_BYTES // row_bytes)
    return {
        f"{name}/{start}": tensor[start : start + rows] for start in range(0, len(tensor), rows)
    }


def _state_entries(model, optimizer, rank: int):
    model_state = model.state_dict()
    optimizer_state = optimizer.state_dict()
    entries = tensor_entries(model_state, "model", rank)
    entries.update(tensor_entries(optimizer_state["state"], "optimizer", rank))
    entries[f"rng/rank{rank}"] = torch.get_rng_state()
    return entries, model_state, optimizer_state


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def read_pointer(root: Path) -> dict:
    path = root / POINTER
    return read_json(path) if path.is_file() else {}


def save_checkpoint(
    root: Path,
    name: str,
    model,
    optimizer,
    trainer_state: dict,
    rank: int,
    roles: tuple[str, ...] = ("latest",),
) -> None:
    """Write checkpoint `name` under `root` on every process; point `roles` at it."""
    staging, target = root / f"{name}.partial", root / name
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    _barrier()
    entries, _, _ = _state_entries(model, optimizer, rank)
    writer = FileSystemWriter(staging, single_file_per_rank=False, thread_count=1)
    dcp.save(entries, storage_writer=writer)
    if rank == 0:
        write_json(staging / TRAINER_STATE, trainer_state)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        pointer = {**read_pointer(root), **dict.fromkeys(roles, name)}
        write_json(root / POINTER, pointer)  # write_json stages and renames
        _remove_unreferenced(root, pointer)
    _barrier()


def _remove_unreferenced(root: Path, pointer: dict) -> None:
    keep = set(pointer.values())
    for path in root.iterdir():
        if path.is_dir() and path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


def checkpoint_path(root: Path, role: str = "latest") -> Path:
    name = read_pointer(root).get(role)
    if not name:
        raise CheckpointError(f"{root} holds no {role} checkpoint ({POINTER} names none)")
    path = root / name
    if not (path / TRAINER_STATE).is_file() or not (path / ".metadata").is_file():
        raise CheckpointError(f"{path} is incomplete: {TRAINER_STATE} or DCP metadata missing")
    return path


def read_trainer_state(path: Path) -> dict:
    return read_json(path / TRAINER_STATE)


def load_checkpoint(path: Path, model, optimizer, rank: int) -> dict:
    """Load a checkpoint into the model and optimizer in place; returns trainer.json."""
    trainer_state = read_trainer_state(path)
    _initialise_lazy_state(optimizer)
    entries, model_state, optimizer_state = _state_entries(model, optimizer, rank)
    reader = MetadataCheckedReader(path)
    stored = reader.read_metadata().state_dict_metadata
    missing = sorted(set(entries) - set(stored))
    if missing:
        raise CheckpointError(
            f"{path} does not match this model, sharding or number of processes: "
            f"{len(missing)} tensors missing, e.g. {missing[0]}"
        )
    for key, tensor in entries.items():
        if tuple(stored[key].size) != tuple(tensor.shape):
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(stored[key].size)}, "
                f"this model's is {tuple(tensor.shape)}"
            )
    try:
        dcp.load(entries, storage_reader=MetadataCheckedReader(path))
    except CheckpointException as error:  # DCP's, a BaseException, wraps a rank's failure
        cause = error.failures and next(iter(error.failures.values()))
        raise CheckpointError(f"{path} could not be read: {last_line(cause)}") from error
    torch.set_rng_state(entries[f"rng/rank{rank}"])
    model.load_state_dict(model_state)
    # Hyper-parameters are not saved: the config gives them, the schedule the rate.
    optimizer.load_state_dict(optimizer_state)
    return trainer_state


def last_line(error) -> str:
    """The line of a (possibly multi-line, traceback-bearing) error that says what failed."""
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__


def _initialise_lazy_state(optimizer) -> None:
    """Give the dense optimizer its state (torch's Adam makes it at the first step)."""
    from torchrec.optim.keyed import KeyedOptimizerWrapper

    for _, part in getattr(optimizer, "optimizers", []):
        if isinstance(part, KeyedOptimizerWrapper) and not part.state:
            part.init_state()
