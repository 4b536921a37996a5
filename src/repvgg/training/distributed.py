"""One process or many (``torchrun``): rank bookkeeping, sums over ranks, and the process group's set-up."""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .device import resolve_device

__all__ = ["Dist", "init_distributed", "plain_bn"]


@dataclass
class Dist:
    """This process's rank among ``world`` training processes (rank 0 logs and writes checkpoints)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Sum ``values`` over ranks (identity in one process)."""
        if self.world == 1:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed(device_name: str | None) -> tuple[Dist, torch.device]:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPU); pick this rank's device."""
    device = resolve_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank), device


def plain_bn(model: nn.Module) -> nn.Module:
    """Replace every SyncBatchNorm inside ``model`` (in place) by a BatchNorm2d, so that the model runs outside the
    process group; returns ``model``."""
    for name, child in model.named_children():
        if isinstance(child, nn.SyncBatchNorm):
            setattr(model, name, _plain(child))
        else:
            plain_bn(child)
    return model


def _plain(sync: nn.SyncBatchNorm) -> nn.BatchNorm2d:
    """A BatchNorm2d holding ``sync``'s own parameters and statistics (so their dtype, device and frozen state carry
    over unchanged) in its training mode: the inverse of ``nn.SyncBatchNorm.convert_sync_batchnorm``."""
    bn = nn.BatchNorm2d(sync.num_features, sync.eps, sync.momentum, sync.affine, sync.track_running_stats,
                        device="meta")
    for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        setattr(bn, key, getattr(sync, key))
    return bn.train(sync.training)
