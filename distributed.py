"""One process or many: torchrun, DDP and FSDP2, a clean ending, and preemption.

``train.py`` runs as one process, or as one per device under ``torchrun`` (gloo on CPU, nccl on
GPU). Every process builds the same batch and keeps its own rows, so nothing here touches the data:
this file starts the process group, wraps the model (DDP, or FSDP2 for the presets too large to
replicate), ends the group cleanly, and turns a preemption signal into a checkpoint.
"""

from __future__ import annotations

import gc
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from model import Denoiser


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Single process, or one process per device under torchrun (RANK/WORLD_SIZE set): gloo on CPU, nccl on GPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device=cuda but no CUDA device is visible")
    if "RANK" not in os.environ:
        return Dist(0, 1, 0, torch.device(device))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return Dist(rank, world, local, torch.device("cuda", local))
    dist.init_process_group("gloo")
    return Dist(rank, world, local, torch.device("cpu"))


def teardown(d: Dist) -> None:
    """End a distributed run: free the process group on every process while all of them are still alive.

    ``dist.destroy_process_group`` only forgets the group; gloo's connections and threads are freed with
    the last object holding them (the DDP wrapper, FSDP's sharded tensors). Left to the interpreter's
    shutdown, a process that gets there while another still uses the connections (rank 0 writing the
    checkpoint) can abort with "terminate called without an active exception". So the caller drops those
    objects, the garbage collector frees them here, a barrier waits for all, and the group is destroyed.
    """
    if d.world > 1:
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


class Preemption:
    """SIGTERM and SIGUSR1 ask the run to stop after the current step, with a checkpoint.

    A cluster preempts a job with SIGTERM (Kubernetes, SLURM at a time limit) or, if asked to
    (``#SBATCH --signal=USR1@120``), SIGUSR1 a while before the kill. The handler only records the signal;
    the loop checks ``requested`` between steps, so the checkpoint is an ordinary one of a finished step
    (``--resume`` continues bit-identically), and the maximum over processes makes all stop after the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum

    def requested(self, d: Dist) -> bool:
        flag = torch.tensor([self.received or 0], device=d.device)
        if d.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.received = int(flag) or None
        return bool(flag)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class NLL(nn.Module):
    """(x_t, x0, where) -> -log p_theta(x0_i | x_t) at ``where``: ``Denoiser.nll_at`` as the forward DDP/FSDP wrap."""

    def __init__(self, model: Denoiser) -> None:
        super().__init__()
        self.model = model

    def forward(self, x_t: torch.Tensor, x0: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        return self.model.nll_at(x_t, x0, where)


def use_fsdp(choice: str, preset: str, d: Dist) -> bool:
    """--fsdp: "true", "false", or "auto" (on for the presets too large for DDP, with several processes)."""
    if choice not in ("auto", "true", "false"):
        raise ValueError(f"--fsdp must be auto, true or false, got {choice!r}")
    return choice == "true" or (choice == "auto" and d.world > 1 and preset in ("large", "xl"))


def wrap(model: Denoiser, d: Dist, fsdp: bool, compile: bool = False, bf16: bool = False) -> nn.Module:
    """Plain, DDP or FSDP2 (each block sharded, then the root; ``bf16``: bf16 compute, fp32 gradient reduction)."""
    if compile:
        for block in model.blocks:
            block.compile()  # in place: state-dict keys stay the same (no "_orig_mod." prefix)
    net = NLL(model)
    if d.world == 1:
        return net
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kw = {"mesh": init_device_mesh(d.device.type, (d.world,))}
        if bf16:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, **kw)
        return fully_shard(net, **kw)
    devices = [d.local_rank] if d.device.type == "cuda" else None  # the buffers are constants: no broadcasts
    return nn.parallel.DistributedDataParallel(net, device_ids=devices, broadcast_buffers=False)
