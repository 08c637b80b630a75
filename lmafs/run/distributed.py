"""Multi-process training under torchrun: which models each rank owns, and the few collectives the trainer needs.

Phase I (nModels > 1): the N models are split into contiguous blocks, one per rank; only the shared AF
gradient crosses ranks (summed, then divided by the number of active models of all ranks).
nModels = 1: plain data parallelism; every rank holds the model and all gradients are averaged.
Without torchrun (WORLD_SIZE unset or 1) every method is a no-op and the rank owns all models.
"""
import datetime
import os

import torch
import torch.distributed as dist


class Distributed:
    def __init__(self):
        self.worldSize = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.localRank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.worldSize > 1
        self.isMain = self.rank == 0

    def start(self, device):
        """Join the process group (NCCL on CUDA, gloo on CPU); returns this rank's device."""
        if not self.enabled:
            return device
        if device.type == "cuda":
            device = torch.device("cuda", self.localRank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
        return device

    def modelRange(self, nModels):
        """Models [start, stop) of this rank: contiguous blocks in phase I, the one model in data parallelism."""
        if nModels == 1:
            return 0, 1
        base, extra = divmod(nModels, self.worldSize)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def sumInPlace(self, tensors):
        if self.enabled:
            for t in tensors:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def maxInPlace(self, tensor):
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def gatherToMain(self, obj):
        """A list of every rank's obj on the main rank (None elsewhere); [obj] without torchrun."""
        if not self.enabled:
            return [obj]
        parts = [None] * self.worldSize if self.isMain else None
        dist.gather_object(obj, parts, dst=0)
        return parts

    def close(self, together=False):
        """Leave the process group. together: the processes stop at a point they agreed on; each waits here until all
        have saved and said why they stop, as torchrun ends the others when one exits with an error."""
        if self.enabled and dist.is_initialized():
            if together:
                dist.barrier(device_ids=[self.localRank] if dist.get_backend() == "nccl" else None)
            dist.destroy_process_group()
