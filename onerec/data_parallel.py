"""Data-parallel training on CPU cores: the training process forks one peer per extra core.

Why: the recipe trains with one torch thread per process, because on a shared 2-core host two
intra-op threads wait on each other whenever one is descheduled (1-5 s/step against 0.2-0.5 s), and
this model's ops are too small for threads to pay anyway. So a build used one core of two. Here
each process takes its share of every batch, and one all-reduce per step sums the gradients, so
every process applies the same update to the same weights (they start equal: the peer is a fork of
the trainer after the model and the optimizer exist). A peer that waits blocks in the all-reduce
instead of spinning, so a busy neighbour slows a step rather than stalling it.

The same all-reduce carries the trainer's clock, so every process stops, warms up and decays on
the same step, and the mean loss of the whole batch. Rank 0 is the calling process: it keeps the
weights, selects epochs and reports; peers return nothing and exit when training ends.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

PEER_TIMEOUT = timedelta(minutes=30)  # a peer waits this long while rank 0 evaluates an epoch


def usable_processes(requested: int, device: str) -> int:
    """Processes to train with: as requested, at most one per core this process may run on, and 1 off
    the CPU or where torch.distributed has no gloo."""
    if requested <= 1 or device != "cpu" or not dist.is_available() or not dist.is_gloo_available():
        return 1
    if dist.is_initialized():  # already inside a process group (not ours): train alone
        return 1
    return min(requested, len(os.sched_getaffinity(0)))


@dataclass
class StepTotals:
    """What one step's all-reduce tells every process."""

    loss: float  # the batch's mean loss (each process's mean weighed by its samples)
    clock: float  # rank 0's share of the time budget spent (what every process's schedule follows)


class GradientGroup:
    """Rank 0 (the caller) and its forked peers; ``rank`` tells each process which one it is."""

    def __init__(self, rank: int, world: int, peers: list[int], rendezvous: str):
        self.rank, self.world, self.peers, self.rendezvous = rank, world, peers, rendezvous

    @classmethod
    def fork(cls, world: int, seed: int) -> GradientGroup:
        """Fork `world - 1` peers and join them in a gloo group. Returns in every process."""
        rendezvous = tempfile.mkdtemp(prefix="onerec-train-")
        rank, peers = 0, list[int]()
        for r in range(1, world):
            pid = os.fork()
            if pid == 0:
                rank, peers = r, list[int]()
                break
            peers.append(pid)
        group = cls(rank, world, peers, rendezvous)
        try:
            if rank:
                torch.manual_seed(seed + rank)  # its own dropout masks; the weights are the fork's
            dist.init_process_group(
                "gloo",
                init_method=f"file://{rendezvous}/store",
                rank=rank,
                world_size=world,
                timeout=PEER_TIMEOUT,
            )
        except BaseException:
            group.abort()  # a peer never returns into the caller's code
            raise
        return group

    def shard(self, idx: np.ndarray) -> np.ndarray:
        """This process's contiguous share of a batch (the first ranks take one more when it is uneven)."""
        bounds = -(-np.arange(self.world + 1) * len(idx) // self.world)  # ceil(r * n / world)
        return idx[bounds[self.rank] : bounds[self.rank + 1]]

    def sum_gradients(
        self, params: Sequence[torch.nn.Parameter], samples: int, loss: float, clock: float
    ) -> StepTotals:
        """Replace every process's gradients by the batch mean (each weighed by its samples).

        A process whose shard was empty passes samples = 0 and no gradients.
        """
        grads = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in params]
        tail = torch.tensor([float(samples), loss * samples, clock if self.rank == 0 else 0.0])
        flat = torch.cat([torch.cat(grads) * float(samples), tail.to(grads[0].dtype)])
        dist.all_reduce(flat)
        total = max(float(flat[-3]), 1.0)
        offset = 0
        for p in params:
            n = p.numel()
            g = flat[offset : offset + n].view_as(p) / total
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            offset += n
        return StepTotals(loss=float(flat[-2]) / total, clock=float(flat[-1]))

    def mean(self, value: float, weight: int) -> float:
        """The weighted mean over processes of one number each (e.g. a loss over each one's rows)."""
        both = torch.tensor([value * weight, float(weight)], dtype=torch.float64)
        dist.all_reduce(both)
        return float(both[0] / both[1].clamp(min=1.0))

    def close(self) -> None:
        """Rank 0: leave the group and reap the peers. A peer: leave and exit the process here."""
        try:
            dist.destroy_process_group()
        finally:
            if self.rank:
                os._exit(0)
            for pid in self.peers:
                os.waitpid(pid, 0)
            shutil.rmtree(self.rendezvous, ignore_errors=True)

    def abort(self) -> None:
        """Training failed in this process: a peer exits with an error; rank 0 stops its peers."""
        if self.rank:
            os._exit(1)
        for pid in self.peers:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        if dist.is_initialized():
            dist.destroy_process_group()
        shutil.rmtree(self.rendezvous, ignore_errors=True)
