"""Training on several processes (``torchrun``) and the order the data comes in.

:func:`setup_distributed` reads torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``)
and returns a :class:`Dist`: this process's rank, the world size, its device, and the few
collectives the trainer needs (each a no-op in a single process).

Data order: epoch ``e`` visits the dataset in the permutation drawn from ``(seed, e)``, cut into
full global batches; each rank takes its contiguous share of every global batch
(:func:`epoch_batches`, :func:`local_batches`). So the data of global batch ``k`` is a function of
``(seed, k)`` alone, whatever the world size, and a resumed run finds the same batches. Tar shards
are streamed instead (:func:`stream_batches` of a :class:`hetvae.shards.ShardStream`): there a
batch is a function of the seed, its position and the number of readers (world size x workers).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from hetvae.data import ImageDataset
from hetvae.schema import ConfigError

__all__ = ["Dist", "all_reduce_mean", "epoch_batches", "local_batches", "setup_distributed", "stream_batches"]


@dataclass
class Dist:
    """This process in the run: ``rank`` of ``world_size`` on ``device``; ``owns_group``: this
    process initialised the process group, so :meth:`close` tears it down."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def main(self) -> bool:
        """Rank 0, the one that writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (a collective: every rank must call it)."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return value.item() > 0

    def mean(self, logs: dict[str, float]) -> dict[str, float]:
        """``logs`` averaged over the ranks (every rank must pass the same keys)."""
        if not self.enabled or not logs:
            return logs
        keys = sorted(logs)
        values = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        values /= self.world_size
        return dict(zip(keys, values.tolist()))

    def minimum(self, value: int) -> int:
        """The smallest of every rank's ``value`` (a collective: every rank must call it)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def broadcast(self, tensors: list[Tensor]) -> None:
        """Give every rank rank 0's ``tensors``, in place."""
        if self.enabled:
            with torch.no_grad():
                for tensor in tensors:
                    dist.broadcast(tensor, src=0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """Tear the process group down if this process set it up."""
        if self.owns_group:
            dist.destroy_process_group()
            self.owns_group = False


def setup_distributed(device: str = "auto") -> Dist:
    """Process group from torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) on
    ``device`` (``train.device``): ``"auto"`` is CUDA when available, else CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise ConfigError("train.device", f"is {device!r} but torch sees no CUDA device; use 'cpu' or 'auto'")
    if world_size <= 1:
        return Dist(device=torch.device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        if device != "cuda":
            raise ConfigError(
                "train.device",
                f"is {device!r} under torchrun (WORLD_SIZE={world_size}): each process takes "
                "the GPU of its LOCAL_RANK, so use 'cuda' or 'auto' (or CUDA_VISIBLE_DEVICES to choose GPUs)"
            )
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ConfigError(
                "train.device",
                f"is '{device}' but process LOCAL_RANK={local_rank} has no GPU of its own: this machine shows {count} CUDA "
                f"device(s); start at most {count} processes per node, or set train.device=cpu to train "
                "on the CPU with gloo"
            )
        torch.cuda.set_device(local_rank)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    placed = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), device=placed, owns_group=owns)


def all_reduce_mean(tensors: list[Tensor], world_size: int) -> None:
    """Average ``tensors`` in place across ranks (one flattened collective)."""
    if not tensors or world_size <= 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def _ignore_sigint(_: int) -> None:
    # DataLoader workers share the terminal's process group; the main process handles Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def epoch_batches(
    n: int, *, global_batch: int, seed: int, start: int, rank: int, world_size: int
) -> Iterator[list[tuple[int, int]]]:
    """This rank's share of global batches ``start, start + 1, ...`` forever, as lists of
    ``(epoch, index)`` keys (:class:`~hetvae.data.ImageDataset` draws each crop from them).

    Epoch ``e`` is the permutation of the ``n`` samples drawn from ``(seed, e)`` cut into
    ``per_epoch = n // global_batch`` full batches (the remainder is dropped, so every batch has
    the same size and the position of batch ``k`` is ``(k // per_epoch, k % per_epoch)``).
    """
    per_epoch = n // global_batch
    local = global_batch // world_size
    epoch, skip = divmod(start, per_epoch)
    while True:
        # a separate stream from the crops' (seed, epoch, index): different entropy tuple
        order = np.random.default_rng((seed, epoch)).permutation(n)[: per_epoch * global_batch]
        for row in order.reshape(per_epoch, global_batch)[skip:, rank * local : (rank + 1) * local].tolist():
            yield [(epoch, i) for i in row]
        epoch, skip = epoch + 1, 0


def local_batches(
    dataset: ImageDataset,
    *,
    global_batch: int,
    seed: int,
    start: int,
    rank: int,
    world_size: int,
    num_workers: int,
) -> Iterator[Tensor]:
    """This rank's share of global batches ``start, start + 1, ...`` forever (:func:`epoch_batches`).

    One ``DataLoader`` serves every epoch: the batches carry their epoch, so its workers live as
    long as the stream, keeping their decoded files and dead-leaves images. (A loader per epoch
    started its workers again at every epoch boundary, every few dozen steps for a folder of a few
    hundred photographs, each decoding its files anew.)
    """
    if len(dataset) < global_batch:
        raise ValueError(
            f"the dataset has {len(dataset)} samples per epoch, fewer than one global batch of {global_batch}: "
            "set data.samples_per_epoch (crops per epoch, cycling through the images) or lower train.batch_size"
        )
    keys = epoch_batches(
        len(dataset), global_batch=global_batch, seed=seed, start=start, rank=rank, world_size=world_size
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=keys,
        num_workers=num_workers,
        worker_init_fn=_ignore_sigint if num_workers else None,
    )
    yield from loader


def stream_batches(stream: torch.utils.data.IterableDataset, *, num_workers: int) -> Iterator[Tensor]:
    """The batches of ``stream``, an ``IterableDataset`` that yields whole batches (a
    :class:`hetvae.shards.ShardStream` laid out for ``num_workers``), from one ``DataLoader`` that
    takes them from its workers in turn (worker 0, 1, ...), as the stream's resume rule expects."""
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        worker_init_fn=_ignore_sigint if num_workers else None,
    )
    yield from loader
