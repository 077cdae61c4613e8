"""Sharded sweeps on torch.distributed (launch with torchrun).

Every rank computes its own clean trajectory (deterministic, so all ranks hold the same one), runs the
probes that `shard_of(clip_id, probe_id, world)` assigns to it, and writes its own Parquet shards into
the shared results folder. Kernels and linear layers are batch invariant, so a probe's row has the same
bits whichever rank ran it in whichever batch: the merged table equals a single-process run's.
Before any work the ranks compare a fingerprint of their configuration (model weights, clip, probe set,
sampler settings) and refuse to start if it differs.

Multi-node: the results folder must be on a filesystem every rank sees (resuming reads all shards).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str


def current() -> Optional[DistributedInfo]:
    """The initialised process group's rank/world, or None when not running distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return DistributedInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                           dist.get_backend())


def rank() -> int:
    info = current()
    return 0 if info is None else info.rank


def is_main_process() -> bool:
    return rank() == 0


def init_from_env(backend: Optional[str] = None) -> Optional[DistributedInfo]:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE set); else do nothing.

    backend: "nccl" when CUDA is available (one GPU per rank: cuda:LOCAL_RANK), else "gloo".
    """
    if current() is not None:
        return current()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:
        # torchrun starts every rank in a session of its own, so killing the launcher (kill -9, a killed
        # job) would leave the ranks running and writing result shards behind a rerun's back (duplicated
        # rows): a rank dies with its launcher instead.
        from .workers import die_with_parent

        die_with_parent()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return current()


def device_for_rank() -> torch.device:
    """cuda:LOCAL_RANK under nccl, else the CPU."""
    info = current()
    if info is not None and info.backend == "nccl":
        return torch.device("cuda", info.local_rank)
    return torch.device("cuda") if torch.cuda.is_available() and info is None else torch.device("cpu")


def barrier() -> None:
    info = current()
    if info is not None and info.world_size > 1:
        if info.backend == "nccl":
            dist.barrier(device_ids=[info.local_rank])
        else:
            dist.barrier()


def model_digest(model: torch.nn.Module) -> str:
    """A cheap fingerprint of a model's weights: names, shapes, dtypes and a strided sample of values.
    (Result folders and rank checks use the full `latentflow_fast.fingerprint.weights_digest`.)"""
    h = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 256)
        sample = flat[::step].to("cpu", torch.float64)
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def check_consistent(fingerprint: dict) -> None:
    """Refuse to run if ranks disagree on the configuration (raises the same ValueError on every rank)."""
    info = current()
    if info is None or info.world_size == 1:
        return
    mine = json.dumps(fingerprint, sort_keys=True, default=str)
    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, mine)
    reference = json.loads(gathered[0])
    for other_rank, text in enumerate(gathered):
        if text != gathered[0]:
            other = json.loads(text)
            keys = sorted(k for k in set(reference) | set(other) if reference.get(k) != other.get(k))
            raise ValueError(f"distributed sweep refused: rank {other_rank} differs from rank 0 in "
                             f"{', '.join(keys)}; every rank must run the same model, clips and probes")
