"""Webdataset tar shards as a streamed training source, and the writer of such shards.

A shard is a plain tar in the layout of the ``webdataset`` package: its members are grouped into
samples by the name up to the first dot of the file name (``000001.jpg`` and ``000001.json`` are
one sample, ``000001``), consecutive members sharing it. A sample's image is its member with the
extension (case ignored) ``jpg``, ``jpeg``, ``png``, ``webp``, ``bmp``, ``tif`` or ``tiff``, the
first of these it has; samples without one are passed over. Only local files are read, with the
standard library's ``tarfile``: a shard's index (its image members' names, offsets and sizes) comes
from the tar headers alone, read by seeking, and an image is read by seeking to its offset.

The stream (:class:`ShardStream`). Readers, "slots", are ``S = world_size * W`` with
``W = max(1, num_workers)``; slot ``s = rank * W + w``. Epoch ``e`` orders the shards by the
permutation drawn from ``numpy.random.default_rng((seed, e))`` and slot ``s`` takes
``perm[s::S]``. A slot reads its epoch's shards in groups of ``shuffle_shards`` consecutive ones,
the samples of group ``g`` in the order of the permutation drawn from
``default_rng((seed, e, s, g, SHUFFLE_TAG))`` (the shuffle buffer). Sample ``p`` of a slot-epoch
(its position, counted from 0 over the groups) is cut from its image by :class:`hetvae.data.Augment`
with every random draw from ``default_rng((seed, e, s, p))``, after the draw that picks a procedural
dead-leaves image instead (``procedural``), as :class:`hetvae.data.ImageDataset` does it. A slot
reads its epochs one after the other forever, ``batch`` samples to a batch, so a batch may straddle
two epochs; within one slot-epoch each sample is read once.

Resuming. ``DataLoader`` takes the batches of its workers in turn, worker ``0, 1, ..., W-1, 0, ...``;
so once a rank has taken ``k`` batches of a stream, the slot at offset ``w`` has made
``len(range(w, k, W))`` of them, a pure function of ``k``. A stream started at ``start = k`` lets
each slot skip that many samples by counting (tar headers only) and hands slot ``(w + k) % W`` to
worker ``w``, so the batches that follow are those an uninterrupted stream gives, bit for bit, as
long as the world size and ``W`` are those of the run. ``origin = (e0, k0)`` restarts every slot at
the start of epoch ``e0`` once ``k0`` batches are taken (what a run resumed on another world size
does, the epochs of the old readers being out of reach).

A member that cannot be decoded, or an image smaller than the crop, is replaced by the next
usable sample of its group (in the group's order, then of the slot-epoch's next groups), with one
warning naming the shard and the member, so positions stay pure functions. A shard that breaks off
(a truncated file, a damaged header) is read up to the member where it breaks, with a warning
naming both; a shard without an image member is warned about and passed over.
"""

from __future__ import annotations

import collections
import glob
import io
import json
import logging
import math
import os
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hetvae.config import DataConfig
from hetvae.data import Augment, ProceduralPool, source_kind
from hetvae.files import write_atomically
from hetvae.images import decode_image, list_images
from hetvae.schema import ConfigError

__all__ = [
    "IMAGE_KEYS", "SHUFFLE_TAG", "ShardIndex", "ShardStream", "WrittenShards", "augment_of", "check_shards",
    "expand_braces", "expand_shards", "first_crops", "index_shard", "names_shards", "shard_pattern", "shard_workers",
    "write_shards",
]

logger = logging.getLogger("hetvae.shards")

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
"""The extensions of a sample's image member, in the order one is chosen when a sample has several."""
SHUFFLE_TAG = 0x5A4D
"""Last entropy word of a group's shuffle, so it never shares a stream with a sample's draws."""
_BLOCK = 512  # tar block size
_MAX_NAMED = 20  # per stream and process: later bad members go to the log at INFO
_INDEX_CACHE_SIZE = 256  # shard indexes kept per process (counts are kept for every shard)
_OPEN_FILES = 16
_EMPTY_EPOCHS = 1000  # consecutive slot-epochs without a sample before a slot gives up


# ---------------------------------------------------------------------------------------------
# patterns
# ---------------------------------------------------------------------------------------------


def _closing(text: str, start: int) -> int | None:
    """Index of the ``}`` matching the ``{`` at ``start``, or None."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def _choices(body: str) -> list[str] | None:
    """The alternatives of a brace body: ``a,b`` (top-level commas) or a range ``000..099``;
    None for a body that is neither (its braces are literal)."""
    parts, depth, last = [], 0, 0
    for i, c in enumerate(body):
        depth += (c == "{") - (c == "}")
        if c == "," and depth == 0:
            parts.append(body[last:i])
            last = i + 1
    if parts:
        return [*parts, body[last:]]
    lo, sep, hi = body.partition("..")
    if sep and lo.lstrip("-").isdigit() and hi.lstrip("-").isdigit():
        a, b = int(lo), int(hi)
        padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (lo, hi))
        width = max(len(lo), len(hi)) if padded else 0
        step = 1 if b >= a else -1
        return [f"{v:0{width}d}" for v in range(a, b + step, step)]
    return None


def expand_braces(pattern: str) -> list[str]:
    """The names a brace pattern stands for, in order: ``{000..099}`` is a range (zero padding
    kept: the width of the wider end when either starts with 0), ``{a,b}`` a list; they nest and
    repeat (``{a,b}-{0..9}``). Braces that are neither are kept as written."""
    start = 0
    while (i := pattern.find("{", start)) >= 0:
        j = _closing(pattern, i)
        if j is None:
            break
        choices = _choices(pattern[i + 1 : j])
        if choices is None:
            start = i + 1
            continue
        head, tail = pattern[:i], pattern[j + 1 :]
        return [head + rest for choice in choices for rest in expand_braces(choice + tail)]
    return [pattern]


def _patterns(path: str | Sequence[str] | None) -> list[str]:
    if path is None:
        return []
    return [path] if isinstance(path, (str, os.PathLike)) else [str(p) for p in path]


def names_shards(path: str | Sequence[str] | None) -> bool:
    """Whether a ``data.path`` value names tar shards: each entry does by
    :func:`hetvae.data.source_kind` (a name ending in ``.tar``: a file, a brace pattern, a glob).
    Raises :class:`~hetvae.schema.ConfigError` for a list mixing shards with other sources (they
    are streamed, the others read by index: one run takes one kind)."""
    kinds = {p: source_kind(p) == "shards" for p in _patterns(path)}
    if kinds and all(kinds.values()):
        return True
    if any(kinds.values()):
        shards = [p for p, is_tar in kinds.items() if is_tar]
        others = [p for p, is_tar in kinds.items() if not is_tar]
        raise ConfigError(
            "data.path",
            f"mixes tar shards ({', '.join(shards[:3])}) with other sources ({', '.join(others[:3])}); a run reads "
            "one kind: write the images into shards too (hetvae shards FOLDER --out OUT), or train on the folders",
        )
    return False


def expand_shards(path: str | Sequence[str]) -> list[Path]:
    """The shard files a ``data.path`` value names: each pattern's braces expanded
    (:func:`expand_braces`), then globs (``*``, ``?``, ``[...]``) matched, sorted; duplicates dropped,
    order kept.

    Raises:
        FileNotFoundError: a pattern matches nothing, or names files that do not exist (the message
            names the pattern and the missing files).
    """
    found: dict[Path, None] = {}
    for pattern in _patterns(path):
        names = expand_braces(os.path.expanduser(pattern))
        missing = []
        for name in names:
            if glob.has_magic(name):
                matches = sorted(glob.glob(name))
                if not matches:
                    missing.append(name)
                found.update((Path(m), None) for m in matches if Path(m).is_file())
            elif Path(name).is_file():
                found[Path(name)] = None
            else:
                missing.append(name)
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            what = "matches no file" if len(missing) == len(names) else f"names {len(missing)} of {len(names)} files that do not exist"
            raise FileNotFoundError(f"tar shard pattern {pattern!r} (data.path) {what}: {shown}")
    return list(found)


# ---------------------------------------------------------------------------------------------
# reading a shard
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ShardIndex:
    """Where the images of one shard are: their member ``names``, data ``offsets`` and ``sizes``
    in tar order, one per sample; ``problem``: why the scan stopped before the end of the archive
    (a truncated or damaged file), or None."""

    path: Path
    names: tuple[str, ...]
    offsets: np.ndarray
    sizes: np.ndarray
    problem: str | None = None

    def __len__(self) -> int:
        return len(self.names)

    def read(self, file, i: int) -> bytes:
        """The bytes of image ``i`` from ``file`` (this shard, opened for binary reading)."""
        file.seek(int(self.offsets[i]))
        data = file.read(int(self.sizes[i]))
        if len(data) != int(self.sizes[i]):
            raise ValueError("the shard ends inside the member (it changed on disk since it was indexed)")
        return data


def _split_name(name: str) -> tuple[str, str]:
    """``dir/000001.seg.png`` -> ``("dir/000001", "seg.png")``: webdataset's sample key and extension."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def _scan(path: Path) -> ShardIndex:
    size = path.stat().st_size
    names: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    problem = None
    key, images = None, {}  # the sample being gathered: its key and {extension: member}

    def close_sample() -> None:
        for ext in IMAGE_KEYS:
            if ext in images:
                member = images[ext]
                names.append(member.name)
                offsets.append(member.offset_data)
                sizes.append(member.size)
                return

    with open(path, "rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.TarError as exc:
            problem = f"not a readable tar file ({exc})"
            tar = None
        last = None
        while tar is not None:
            try:
                member = tar.next()
            except tarfile.TarError as exc:
                problem = f"the archive breaks after member {last!r} ({exc})"
                break
            if member is None:
                f.seek(tar.offset)
                block = f.read(_BLOCK)
                if len(block) < _BLOCK or block.count(0) != _BLOCK:  # not the end-of-archive marker
                    where = f"after member {last!r}" if last is not None else "at its start"
                    problem = f"the archive breaks off {where} (truncated or damaged)"
                break
            if member.offset_data + member.size > size:
                problem = f"member {member.name!r} extends past the end of the file (truncated)"
                break
            last = member.name
            if not member.isfile():
                continue
            sample, ext = _split_name(member.name)
            if sample != key:
                close_sample()
                key, images = sample, {}
            base = member.name.rpartition("/")[2]
            if not base.startswith("."):
                images.setdefault(ext.lower(), member)
    close_sample()
    return ShardIndex(path=path, names=tuple(names), offsets=np.asarray(offsets, dtype=np.int64),
                      sizes=np.asarray(sizes, dtype=np.int64), problem=problem)


_indexes: collections.OrderedDict[tuple, ShardIndex] = collections.OrderedDict()
_warned: set[tuple] = set()


def index_shard(path: str | os.PathLike) -> ShardIndex:
    """The index of the shard at ``path``, from its tar headers (no image is read or decoded);
    kept per process (:data:`_INDEX_CACHE_SIZE` shards, least recently used dropped) and read again
    when the file changes. A shard that breaks off, or holds no image member, is warned about once
    per process (``UserWarning`` naming it and the member where it broke)."""
    path = Path(path)
    try:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
    except OSError:
        key = (str(path), None, None)
    index = _indexes.get(key)
    if index is not None:
        _indexes.move_to_end(key)
        return index
    try:
        index = _scan(path)
    except OSError as exc:  # gone or unreadable since it was listed: no image of it is read
        empty = np.zeros(0, dtype=np.int64)
        index = ShardIndex(path=path, names=(), offsets=empty, sizes=empty,
                           problem=f"cannot be read ({exc.strerror or exc})")
    _indexes[key] = index
    while len(_indexes) > _INDEX_CACHE_SIZE:
        _indexes.popitem(last=False)
    if key not in _warned:
        _warned.add(key)
        if index.problem is not None:
            warnings.warn(f"tar shard {path}: {index.problem}; its {len(index)} image(s) before that are used",
                          UserWarning, stacklevel=2)
        elif not len(index):
            warnings.warn(f"tar shard {path} holds no image member (extensions {', '.join(IMAGE_KEYS)}); it is "
                          "passed over", UserWarning, stacklevel=2)
    return index


def check_shards(shards: Sequence[Path], *, global_batch: int, slots: int, workers: int, world_size: int) -> None:
    """Refuse shards a stream of ``slots`` readers cannot serve: fewer shards than readers, or
    fewer images in all of them than one global batch (indexes are read until that many are found,
    usually in the first shard)."""
    if not shards:
        raise ValueError("no tar shards given")
    if len(shards) < slots:
        raise ValueError(
            f"{len(shards)} tar shard(s) for {slots} readers (world size {world_size} x {workers} data worker(s)): "
            "every reader needs a shard of its own each epoch. Write more, smaller shards (hetvae shards FOLDER --out "
            "OUT --size N with a smaller N), or lower data.num_workers"
        )
    found = 0
    for path in shards:
        found += len(index_shard(path))
        if found >= global_batch:
            return
    if not found:
        raise ValueError(f"none of the {len(shards)} tar shard(s) holds an image member (extensions "
                         f"{', '.join(IMAGE_KEYS)}), e.g. {shards[0]}")
    raise ValueError(f"the {len(shards)} tar shard(s) hold {found} image(s), fewer than one global batch of "
                     f"{global_batch}: lower train.batch_size or add images")


def augment_of(data: DataConfig, resolution: int) -> Augment:
    """The training crop of ``data`` (a config's ``data`` section) at side ``resolution``: what
    :func:`hetvae.data.build_dataset` gives a folder, refused in the same cases."""
    augments = data.rescale is not None or data.color_jitter > 0 or data.tint_gray > 0 or data.procedural > 0
    if augments and not data.random_crop:
        raise ValueError("data.rescale, color_jitter, tint_gray and procedural are training augmentations and need "
                         "data.random_crop=true")
    return Augment(
        resolution=resolution, random_crop=data.random_crop, random_flip=data.random_flip,
        rescale=tuple(data.rescale) if data.rescale is not None else None,
        color_jitter=float(data.color_jitter), tint_gray=float(data.tint_gray),
    )


def shard_workers(setting: int, shards: int, world_size: int, *, auto: bool) -> int:
    """The ``DataLoader`` workers of a shard stream: ``setting`` (resolved ``data.num_workers``);
    for ``auto``, no more than the shards each process can give a worker of its own."""
    if auto:
        return max(1, min(setting, shards // max(world_size, 1)))
    return setting


# ---------------------------------------------------------------------------------------------
# the stream
# ---------------------------------------------------------------------------------------------


class ShardStream(torch.utils.data.IterableDataset):
    """This rank's batches of ``batch`` crops from ``shards``, forever (see the module docstring
    for the order and the resume rule). Under a ``DataLoader`` with ``batch_size=None`` and
    ``num_workers`` workers; or by :meth:`worker_batches` directly.

    Args:
        shards: the shard files, in a fixed order (:func:`expand_shards`).
        augment: the crop and augmentations (:class:`hetvae.data.Augment`).
        batch: samples per batch (this rank's share of a global batch).
        seed: ``train.seed``.
        start: batches this rank has already taken from the stream.
        rank, world_size: this process in the run.
        num_workers: ``DataLoader`` workers (0: the main process reads; one slot either way).
        shuffle_shards: shards per shuffle group.
        procedural, procedural_pool: fraction of crops from dead-leaves images, and their pool size.
        origin: ``(epoch, batches)``: every slot began epoch ``epoch`` at position 0 once the rank
            had taken ``batches`` batches.
    """

    def __init__(
        self,
        shards: Sequence[str | os.PathLike],
        *,
        augment: Augment,
        batch: int,
        seed: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_shards: int = 4,
        procedural: float = 0.0,
        procedural_pool: int = 64,
        origin: tuple[int, int] = (0, 0),
    ) -> None:
        super().__init__()
        if batch < 1 or shuffle_shards < 1 or not 0 <= rank < world_size or num_workers < 0:
            raise ValueError(f"bad stream layout: batch={batch}, shuffle_shards={shuffle_shards}, rank={rank}, "
                             f"world_size={world_size}, num_workers={num_workers}")
        if start < origin[1]:
            raise ValueError(f"start={start} lies before the origin {origin}")
        self.shards = [Path(p) for p in shards]
        self.augment = augment
        self.batch = batch
        self.seed = seed
        self.start = start
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.workers = max(1, num_workers)
        self.slots = world_size * self.workers
        if len(self.shards) < self.slots:
            raise ValueError(
                f"{len(self.shards)} tar shard(s) for {self.slots} readers (world size {world_size} x "
                f"{self.workers} data worker(s)): write more, smaller shards (hetvae shards --size) or lower "
                "data.num_workers"
            )
        self.shuffle_shards = shuffle_shards
        self.procedural = float(procedural)
        self.procedural_pool = int(procedural_pool)
        self.origin = (int(origin[0]), int(origin[1]))
        # per process (each worker has its own copies)
        self._counts: dict[int, int] = {}
        self._bad: dict[tuple[int, int], str] = {}
        self._named = 0
        self._files: collections.OrderedDict[int, io.BufferedReader] = collections.OrderedDict()
        self._pool = ProceduralPool(seed, 2 * augment.resolution)  # ImageDataset's pool

    def __getstate__(self):  # open files stay in the process that opened them
        state = self.__dict__.copy()
        state["_files"] = collections.OrderedDict()
        return state

    # -- the order --------------------------------------------------------------------------

    def epoch_shards(self, epoch: int, slot: int) -> list[int]:
        """Indices (into ``shards``) of the shards slot ``slot`` reads in epoch ``epoch``, in order."""
        perm = np.random.default_rng((self.seed, epoch)).permutation(len(self.shards))
        return perm[slot :: self.slots].tolist()

    def _groups(self, epoch: int, slot: int) -> list[list[int]]:
        order = self.epoch_shards(epoch, slot)
        g = self.shuffle_shards
        return [order[i : i + g] for i in range(0, len(order), g)]

    def _count(self, shard: int) -> int:
        if shard not in self._counts:
            self._counts[shard] = len(index_shard(self.shards[shard]))
        return self._counts[shard]

    def _group_order(self, epoch: int, slot: int, group: int, size: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch, slot, group, SHUFFLE_TAG)).permutation(size)

    def _member(self, group: list[int], j: int) -> tuple[int, int]:
        """Sample ``j`` of a group (counted over its shards in order) as ``(shard, image)``."""
        for shard in group:
            n = self._count(shard)
            if j < n:
                return shard, j
            j -= n
        raise IndexError(j)

    def epoch_members(self, epoch: int, slot: int) -> list[tuple[Path, str]]:
        """``(shard, member name)`` of every sample slot ``slot`` reads in epoch ``epoch``, in order
        (the images before any replacement of an unusable one)."""
        out = []
        for g, group in enumerate(self._groups(epoch, slot)):
            size = sum(self._count(s) for s in group)
            for j in self._group_order(epoch, slot, g, size).tolist():
                shard, i = self._member(group, j)
                out.append((self.shards[shard], index_shard(self.shards[shard]).names[i]))
        return out

    def slot_of(self, worker: int) -> tuple[int, int]:
        """``(slot, batches it has made)`` of ``DataLoader`` worker ``worker`` of this stream: the
        loader asks its workers in turn from worker 0, and batch ``start`` is the turn of the slot
        at offset ``(start - origin batches) % W``."""
        taken = self.start - self.origin[1]
        offset = (worker + taken) % self.workers
        return self.rank * self.workers + offset, len(range(offset, taken, self.workers))

    def position(self, slot: int, samples: int) -> tuple[int, int]:
        """``(epoch, position)`` slot ``slot`` reaches after reading ``samples`` samples from the
        origin, by counting the samples of its shards (tar headers only)."""
        epoch, empty = self.origin[0], 0
        while True:
            total = sum(self._count(s) for s in self.epoch_shards(epoch, slot))
            if samples < total:
                return epoch, samples
            empty = empty + 1 if total == 0 else 0
            if empty > _EMPTY_EPOCHS:
                raise ValueError(f"slot {slot} found no image in {_EMPTY_EPOCHS} epochs of its tar shards")
            samples -= total
            epoch += 1

    def furthest_epoch(self) -> int:
        """The furthest epoch any slot of this layout (every rank's) has reached at ``start``."""
        taken = self.start - self.origin[1]
        return max(
            self.position(slot, len(range(slot % self.workers, taken, self.workers)) * self.batch)[0]
            for slot in range(self.slots)
        )

    # -- samples ----------------------------------------------------------------------------

    def _file(self, shard: int):
        f = self._files.get(shard)
        if f is None:
            f = open(self.shards[shard], "rb")  # noqa: SIM115 - kept open across samples
            self._files[shard] = f
            while len(self._files) > _OPEN_FILES:
                self._files.popitem(last=False)[1].close()
        else:
            self._files.move_to_end(shard)
        return f

    def _pixels(self, shard: int, i: int) -> np.ndarray | None:
        """Image ``i`` of ``shard``, or None (named in one warning) when it cannot be decoded or is
        smaller than the crop."""
        if (shard, i) in self._bad:
            return None
        name, r = f"#{i}", self.augment.resolution
        try:
            index = index_shard(self.shards[shard])
            if i >= len(index):
                raise ValueError("the shard changed on disk since it was indexed")
            name = index.names[i]
            pixels = decode_image(index.read(self._file(shard), i), f"{self.shards[shard]}:{name}")
        except (OSError, ValueError) as exc:
            problem = str(exc)
        else:
            if min(pixels.shape[:2]) >= r:
                return pixels
            problem = f"{pixels.shape[1]}x{pixels.shape[0]} is smaller than the {r}x{r} crop"
        self._bad[(shard, i)] = problem
        self._named += 1
        message = f"tar shard {self.shards[shard]}, member {name!r}: {problem}; the next usable sample of its group is used"
        if self._named <= _MAX_NAMED:
            more = f" (further ones are logged by {logger.name} at INFO)" if self._named == _MAX_NAMED else ""
            warnings.warn(message + more, UserWarning, stacklevel=3)
        else:
            logger.info(message)
        return None

    def _usable(self, epoch: int, slot: int, groups: list[list[int]], g: int, order: np.ndarray, q: int) -> np.ndarray:
        """The pixels of sample ``q`` (in the order ``order``) of group ``g``, or of the next usable
        one: the group's later samples, wrapping around, then the next groups'."""
        n = len(order)
        for d in range(n):
            pixels = self._pixels(*self._member(groups[g], int(order[(q + d) % n])))
            if pixels is not None:
                return pixels
        for h in list(range(g + 1, len(groups))) + list(range(g)):
            size = sum(self._count(s) for s in groups[h])
            for j in self._group_order(epoch, slot, h, size).tolist():
                pixels = self._pixels(*self._member(groups[h], j))
                if pixels is not None:
                    return pixels
        names = ", ".join(str(self.shards[s]) for group in groups for s in group)
        raise ValueError(f"no image of at least {self.augment.resolution}x{self.augment.resolution} px can be "
                         f"decoded in the tar shards of slot {slot}, epoch {epoch}: {names}")

    def _samples(self, slot: int, epoch: int, position: int) -> Iterator[Tensor]:
        """Slot ``slot``'s crops from ``(epoch, position)`` on, forever."""
        empty = 0
        while True:
            groups = self._groups(epoch, slot)
            base = 0
            for g, group in enumerate(groups):
                size = sum(self._count(s) for s in group)
                if position >= base + size:
                    base += size
                    continue
                order = self._group_order(epoch, slot, g, size)
                for q in range(position - base, size):
                    rng = np.random.default_rng((self.seed, epoch, slot, base + q))
                    if self.procedural > 0 and rng.random() < self.procedural:
                        pixels = self._pool[int(rng.integers(self.procedural_pool))]
                    else:
                        pixels = self._usable(epoch, slot, groups, g, order, q)
                    yield self.augment(pixels, rng)
                base += size
                position = base
            empty = empty + 1 if base == 0 else 0
            if empty > _EMPTY_EPOCHS:
                raise ValueError(f"slot {slot} found no image in {_EMPTY_EPOCHS} epochs of its tar shards")
            epoch, position = epoch + 1, 0

    def worker_batches(self, worker: int) -> Iterator[Tensor]:
        """The batches ``DataLoader`` worker ``worker`` yields: its slot's (:meth:`slot_of`), from
        where that slot stands."""
        slot, made = self.slot_of(worker)
        epoch, position = self.position(slot, made * self.batch)
        crops = self._samples(slot, epoch, position)
        try:
            while True:
                yield torch.stack([next(crops) for _ in range(self.batch)])
        finally:
            for f in self._files.values():
                f.close()
            self._files.clear()

    def __iter__(self) -> Iterator[Tensor]:
        info = torch.utils.data.get_worker_info()
        if info is None:
            if self.num_workers:
                raise RuntimeError(f"a stream of {self.num_workers} workers read outside a DataLoader of as many")
            return self.worker_batches(0)
        if info.num_workers != self.workers:
            raise RuntimeError(f"a stream laid out for {self.workers} workers in a DataLoader of {info.num_workers}")
        return self.worker_batches(info.id)


# ---------------------------------------------------------------------------------------------
# the sample panels
# ---------------------------------------------------------------------------------------------


def first_crops(shards: Sequence[str | os.PathLike], count: int, resolution: int, *, least: int,
                look: int = 16) -> Tensor:
    """Centre crops of the first ``count`` usable images of ``shards`` (in their order), of side
    ``resolution`` where at least one of the first ``look`` images is that large, else of side
    ``least`` (the training crop). Unusable members are passed over silently. ``(n, 3, R, R)``."""
    images: list[np.ndarray] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in shards:
            index = index_shard(path)
            with open(path, "rb") as f:
                for i in range(len(index)):
                    try:
                        images.append(decode_image(index.read(f, i), f"{path}:{index.names[i]}"))
                    except (OSError, ValueError):
                        continue
                    if len(images) >= look:
                        break
            if len(images) >= look:
                break
    for side in (resolution, least):
        chosen = [p for p in images if min(p.shape[:2]) >= side][:count]
        if chosen:
            crop = Augment(resolution=side, random_crop=False, random_flip=False)
            return torch.stack([crop(p, None) for p in chosen])
    raise ValueError(f"no image of at least {least}x{least} px in the first {len(images)} of the tar shards")


# ---------------------------------------------------------------------------------------------
# writing shards
# ---------------------------------------------------------------------------------------------


SHARD_NAME = "shard-{:06d}.tar"
"""The file name of shard ``k`` written by :func:`write_shards`."""


@dataclass(frozen=True)
class WrittenShards:
    """What :func:`write_shards` wrote: the ``paths`` of the shards, the count of ``images`` in
    them, and the ``pattern`` naming them all, for ``data.path``."""

    paths: list[Path]
    images: int
    pattern: str


def shard_pattern(out: str | os.PathLike, count: int) -> str:
    """The brace pattern naming shards ``0 .. count-1`` written into ``out``."""
    return str(Path(out) / SHARD_NAME.replace("{:06d}", "{" + f"{0:06d}..{count - 1:06d}" + "}"))


def _write_tar(tmp: Path, members: list[tuple[str, Path | bytes]]) -> None:
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in members:
            data = content if isinstance(content, bytes) else content.read_bytes()  # one image in memory at a time
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644  # same files, same bytes
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))


def write_shards(images: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike, *,
                 size: int = 1000) -> WrittenShards:
    """Write the image files under ``images`` (folders searched recursively, as
    :func:`hetvae.images.list_images` lists them) into webdataset tar shards ``out/shard-000000.tar``,
    ... of ``size`` images each. Sample ``i`` (in that order) is ``<key>.<ext>``, the file's bytes as
    they are (never re-encoded; the extension lower-cased), and ``<key>.json``, ``{"source": the
    file's path relative to the folder given}``, with ``key`` = ``i`` in 9 digits. Each shard is
    written atomically (:func:`hetvae.files.write_atomically`); the same files give the same bytes.

    Raises:
        FileNotFoundError, ValueError: as :func:`~hetvae.images.list_images` (no images, a missing path).
    """
    if size < 1:
        raise ValueError(f"size must be a positive number of images per shard, got {size}")
    sources = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    files = list_images(sources)
    roots = [Path(s).expanduser() for s in sources]
    out = Path(out).expanduser()
    paths = []
    for k in range(math.ceil(len(files) / size)):
        members: list[tuple[str, Path | bytes]] = []
        for i in range(k * size, min((k + 1) * size, len(files))):
            file = files[i]
            root = next((r for r in roots if r.is_dir() and file.is_relative_to(r)), file.parent)
            key = f"{i:09d}"
            members.append((f"{key}.{file.suffix.lower().lstrip('.')}", file))
            members.append((f"{key}.json", json.dumps({"source": file.relative_to(root).as_posix()}).encode()))
        path = out / SHARD_NAME.format(k)
        write_atomically(path, lambda tmp, members=members: _write_tar(tmp, members))
        paths.append(path)
    return WrittenShards(paths=paths, images=len(files), pattern=shard_pattern(out, len(paths)))
