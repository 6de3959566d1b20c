"""Sampling sharded over processes with torch.distributed (`torchrun --nproc_per_node N ...`).

Batch b of a run (images [b·bs, (b+1)·bs)) goes to rank b mod N. A batch's images depend only on the seed,
the batch index and the batch size (ddim.sampling.generate), so N processes produce exactly the images of one.
Rank 0 does what happens once (calibration, writing results, FID); the others wait for it at a barrier.
Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op for a single process.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Calibration runs on rank 0 while the others wait at a barrier: allow it hours, not the default minutes.
BARRIER_TIMEOUT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def batches(self, n_batches: int) -> range:
        """This process's batch indices: b = rank, rank + world, ..."""
        return range(self.rank, n_batches, self.world)


def setup(device: str | None) -> tuple[Shard, torch.device]:
    """(this process's shard, its device). Under torchrun: joins the process group (NCCL on CUDA, gloo on
    the CPU) and takes GPU LOCAL_RANK; otherwise a single shard on `device` (default: CUDA if available)."""
    want = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Shard(), want
    if want.type == "cuda":
        want = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(want)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want.type == "cuda" else "gloo", timeout=BARRIER_TIMEOUT)
    return Shard(dist.get_rank(), dist.get_world_size()), want


def barrier(shard: Shard) -> None:
    if shard.world > 1:
        dist.barrier()


def gather_to_main(shard: Shard, local: dict) -> dict | None:
    """Merge every rank's dict on rank 0 (None elsewhere)."""
    if shard.world == 1:
        return local
    parts = [None] * shard.world if shard.main else None
    dist.gather_object(local, parts, dst=0)
    return {k: v for part in parts for k, v in part.items()} if shard.main else None


def teardown(shard: Shard) -> None:
    if shard.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
