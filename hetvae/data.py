"""The training data: random crops of photographs with augmentations (rescaling, flips, colour
jitter, tints of grayscale crops, procedural dead-leaves images), as a map-style dataset of image
files (folders, list files) or of Hugging Face dataset rows (:mod:`hetvae.hfdata`); what a data
path names is told by :func:`source_kind`. Tar shards are streamed instead (``hetvae.shards``).

Everything yields float tensors ``(3, R, R)`` in ``[-1, 1]`` (``x / 127.5 - 1`` of 8-bit RGB),
the range Stable Diffusion's VAE is trained on.

Images are *cropped*, never resized: a resize low-pass filters the picture and would change the
very pixel statistics (noise, texture, edges) the per-pixel log-scale is meant to model.

With no data path the library trains on :func:`sample_images`, photographs that ship inside the
scikit-image wheel, so a fresh install has real images and needs no download.
"""

from __future__ import annotations

import bisect
import collections
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from hetvae import hfdata
from hetvae.config import DataConfig
from hetvae.images import (
    LIST_SUFFIX,
    decode_image,
    image_size,
    list_images,
    read_image,
    sample_images,
    to_rgb_uint8,
)
from hetvae.metrics import LUMA_WEIGHTS
from hetvae.procedural import dead_leaves

logger = logging.getLogger("hetvae.data")

def jitter_colors(crop: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Mild colour jitter of an ``(H, W, 3)`` uint8 crop, returned as uint8 (8-bit values stay 8-bit).

    Brightness and contrast factors in ``1 +- strength``, saturation in ``1 +- 2 strength``, a hue
    rotation of up to ``+- strength * 36`` degrees (about the grey axis, luma kept). A grey image
    stays grey. ``strength`` 0.1 is a mild, photograph-preserving setting.
    """
    x = crop.astype(np.float32) / 255.0
    luma = x @ np.array(LUMA_WEIGHTS, dtype=np.float32)
    angle = np.deg2rad(rng.uniform(-36.0, 36.0) * strength)
    saturation = rng.uniform(1 - 2 * strength, 1 + 2 * strength)
    brightness = rng.uniform(1 - strength, 1 + strength)
    contrast = rng.uniform(1 - strength, 1 + strength)
    chroma = x - luma[..., None]
    # rotate the chroma vector about the grey axis (1, 1, 1) / sqrt(3): Rodrigues' formula
    k = np.full(3, 1 / np.sqrt(3), dtype=np.float32)
    c, s = np.cos(angle), np.sin(angle)
    chroma = chroma * c + np.cross(k, chroma) * s + np.outer(chroma.reshape(-1, 3) @ k, k).reshape(chroma.shape) * (1 - c)
    x = luma[..., None] + saturation * chroma
    x = (x - x.mean()) * contrast + x.mean()
    x = x * brightness
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def tint_gray(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random colour tint of a grey ``(H, W, 3)`` uint8 crop (``R == G == B``), returned as uint8.

    Two random hues: an overall colour cast of up to 0.25 (on the [0, 1] scale) in one, and a
    luma-dependent tint in the other, shadows and highlights pushed apart by up to 0.5 times the
    luma's deviation from its mean (a duotone, as a toned black-and-white print). The luminance
    structure, which is what a grayscale texture photograph teaches, is kept; the colour it gains
    gives the chroma of every crop a share of the gradient. Without it a model trained on mostly
    grey photographs learns colour last and reconstructs new photographs washed out.
    """
    luma = crop[..., 0].astype(np.float32) / 255.0

    def hue() -> np.ndarray:  # a unit chroma direction (orthogonal to the grey axis)
        v = rng.standard_normal(3)
        v -= v.mean()
        return (v / np.linalg.norm(v)).astype(np.float32)

    cast = rng.uniform(0.0, 0.25) * hue()
    duotone = rng.uniform(-0.5, 0.5) * hue()
    x = luma[..., None] + cast + (luma - luma.mean())[..., None] * duotone
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _is_gray(crop: np.ndarray) -> bool:
    return bool((crop[..., 0] == crop[..., 1]).all() and (crop[..., 1] == crop[..., 2]).all())


def to_unit_tensor(crop: np.ndarray) -> torch.Tensor:
    """An ``(H, W, 3)`` uint8 crop as a ``(3, H, W)`` float32 tensor in ``[-1, 1]`` (``x / 127.5 - 1``)."""
    # a copy: the crop may be a view of a shared, read-only cached image
    x = torch.from_numpy(np.ascontiguousarray(crop).copy()).permute(2, 0, 1)
    return x.to(torch.float32).div_(127.5).sub_(1.0)


@dataclass(frozen=True)
class Augment:
    """How a training sample is cut from a decoded image: a square crop of side ``resolution``
    (random or centred), optionally of a larger window shrunk to it (``rescale``), a random
    horizontal flip, a tint of grey crops and a colour jitter (see :class:`ImageDataset`).

    Every random choice is drawn from ``rng`` in a fixed order, so one generator seeded from the
    sample's identity makes the sample a pure function of it, whichever source decoded the image.
    """

    resolution: int
    random_crop: bool = True
    random_flip: bool = True
    rescale: tuple[float, float] | None = None
    color_jitter: float = 0.0
    tint_gray: float = 0.0

    def __call__(self, pixels: np.ndarray, rng: np.random.Generator | None) -> torch.Tensor:
        """The sample cut from ``pixels`` (``(H, W, 3)`` uint8, both sides at least ``resolution``);
        ``rng`` may be ``None`` only when nothing is random (centre crop, no flip)."""
        r = self.resolution
        height, width = pixels.shape[:2]
        side = r
        if self.rescale is not None:
            # a window of r / scale pixels shrunk to r: the content seen at a smaller scale
            scale = max(rng.uniform(*self.rescale), r / min(height, width))
            side = min(int(round(r / scale)), height, width)
        top, left = (height - side) // 2, (width - side) // 2
        if self.random_crop:
            top = int(rng.integers(0, height - side + 1))
            left = int(rng.integers(0, width - side + 1))
        flip = bool(rng.random() < 0.5) if self.random_flip else False
        crop = pixels[top : top + side, left : left + side]
        if side != r:
            crop = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((r, r), Image.Resampling.LANCZOS))
        if flip:
            crop = crop[:, ::-1]
        if self.tint_gray > 0 and _is_gray(crop) and rng.random() < self.tint_gray:
            crop = tint_gray(crop, rng)
        if self.color_jitter > 0:
            crop = jitter_colors(crop, rng, self.color_jitter)
        return to_unit_tensor(crop)


class ProceduralPool:
    """Colour dead-leaves images of side ``side`` (:func:`hetvae.procedural.dead_leaves`), entry
    ``k`` a pure function of ``(seed, k)``, made on first use and kept read-only: the pool the
    ``procedural`` fraction of training crops is cut from, by map-style and streamed sources alike."""

    def __init__(self, seed: int, side: int) -> None:
        self.seed = seed
        self.side = side
        self._images: dict[int, np.ndarray] = {}

    def __getitem__(self, k: int) -> np.ndarray:
        if k not in self._images:
            image = dead_leaves(self.side, np.random.default_rng((self.seed, 0x5EED, k)))
            image.flags.writeable = False
            self._images[k] = image
        return self._images[k]

    def __len__(self) -> int:
        """How many of the images have been made so far."""
        return len(self._images)


def resolve_num_workers(setting: int | str, dataset: "ImageDataset | None" = None) -> int:
    """``data.num_workers`` as a number: an int as given; ``"auto"``: 0 when every image of
    ``dataset`` is held in memory (nothing to decode: a worker would only add its start-up),
    otherwise ``min(4, the cores this process may use)``."""
    if setting != "auto":
        return int(setting)
    if dataset is not None and getattr(dataset, "in_memory", False):
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return min(4, cores)


# ---------------------------------------------------------------------------------------------
# dataset
# ---------------------------------------------------------------------------------------------


SourceKind = Literal["folder", "image", "list", "hf", "parquet", "shards"]
SHARD_SUFFIX = ".tar"


def source_kind(path: str | os.PathLike) -> SourceKind:
    """What a data path names, by its name and, for a folder, the files that mark a dataset:

    - ``"shards"``: webdataset tar shards: a ``.tar`` path, a brace pattern such as
      ``"shards/train-{000000..000099}.tar"`` or a glob; streamed by the trainer, not read here
      (see :func:`build_dataset`);
    - ``"parquet"``: ``.parquet`` file(s), a path or a glob pattern (a Hugging Face dataset);
    - ``"hf"``: a folder written by ``save_to_disk`` (``dataset_info.json`` and ``state.json``, or
      ``dataset_dict.json``; :mod:`hetvae.hfdata`);
    - ``"list"``: a ``.txt`` file listing image paths (:func:`hetvae.images.read_list_file`);
    - ``"folder"``: any other folder (searched recursively for image files);
    - ``"image"``: anything else, an image file (checked when it is listed).

    Nothing is opened; a path that does not exist is classified by its name alone.
    """
    text = os.fspath(path)
    lower = text.lower()
    if lower.endswith(SHARD_SUFFIX):
        return "shards"
    if hfdata.is_parquet(text):
        return "parquet"
    folder = Path(text).expanduser()
    if folder.is_dir():
        return "hf" if hfdata.is_dataset_folder(folder) else "folder"
    if lower.endswith(LIST_SUFFIX):
        return "list"
    return "image"


def _refuse_shards(path: str | os.PathLike) -> None:
    raise ValueError(
        f"data path {os.fspath(path)!r} names webdataset tar shards, which are streamed by the trainer's shard "
        "source (hetvae.shards), not read map-style: ImageDataset / build_dataset cannot read them. "
        "Train on them with hetvae train (data.path), or use a folder, a list file or a Hugging Face dataset here"
    )


# ---------------------------------------------------------------------------------------------
# dataset
# ---------------------------------------------------------------------------------------------


class _Files:
    """Image files, decoded on access."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, j: int) -> str:
        return str(self.paths[j])

    def read(self, j: int) -> np.ndarray:
        return read_image(self.paths[j])

    def size(self, j: int) -> tuple[int, int]:
        return image_size(self.paths[j])


class _Rows:
    """The images of a Hugging Face dataset's column (:class:`hetvae.hfdata.DatasetImages`),
    decoded on access by the rules of image files."""

    def __init__(self, images: hfdata.DatasetImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def name(self, j: int) -> str:
        return self.images.name(j)

    def read(self, j: int) -> np.ndarray:
        payload = self.images.payload(j)
        if isinstance(payload, str):  # an image stored by reference
            return read_image(payload)
        return decode_image(payload, self.name(j))

    def size(self, j: int) -> tuple[int, int]:
        payload = self.images.payload(j)
        if isinstance(payload, str):
            return image_size(payload)
        return image_size(payload, self.name(j))


class _Arrays:
    """In-memory images, converted to ``(H, W, 3)`` uint8 once."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.arrays: list[np.ndarray] = []

    def add(self, name: str, array) -> None:
        self.names.append(name)
        self.arrays.append(to_rgb_uint8(np.asarray(array), name))

    def __len__(self) -> int:
        return len(self.arrays)

    def name(self, j: int) -> str:
        return self.names[j]

    def read(self, j: int) -> np.ndarray:
        return self.arrays[j]

    def size(self, j: int) -> tuple[int, int]:
        return self.arrays[j].shape[:2]


ImageSource = str | os.PathLike | np.ndarray | Image.Image | tuple[str, np.ndarray]
Check = Literal["full", "header", "lazy"]
_UNKNOWN, _USABLE, _UNUSABLE = 0, 1, 2  # what this process knows of an image (ImageDataset._state)


class ImageDataset(torch.utils.data.Dataset):
    """Square crops of images as ``(3, R, R)`` float32 tensors in ``[-1, 1]``.

    Args:
        sources: a folder, an image file, a list file (``.txt``, image paths one a line:
            :func:`hetvae.images.read_list_file`), a Hugging Face dataset (a ``save_to_disk``
            folder or ``.parquet`` files: :class:`hetvae.hfdata.DatasetImages`), or a list of these
            and of in-memory images; what a path names is told by :func:`source_kind`. An in-memory
            image is a ``(name, array)`` pair (what :func:`sample_images` returns), a bare uint8
            array ``(H, W)`` / ``(H, W, 1|3|4)``, or a PIL image. Tar shards are refused (streamed
            by the trainer instead).
        resolution: crop side ``R`` in pixels.
        random_crop: a uniformly random ``R x R`` window; ``False``: the centre window.
        random_flip: a horizontal flip with probability 1/2.
        seed: with ``set_epoch`` and the index, fixes every random choice (see below).
        tiles: evaluation mode (needs ``random_crop=False`` and ``check="full"``): every image
            yields all its non-overlapping ``R x R`` tiles, row by row, the grid centred in the
            image, instead of one centre crop; ``len()`` is the total tile count.
        num_samples: length of an epoch; index ``i`` shows image ``i % n_images``. Default: one
            sample per image. Useful when a few images must fill many batches.
        rescale: ``(lo, hi)``, ``0 < lo <= hi <= 1``: each crop first takes a window of
            ``R / scale`` pixels, ``scale ~ U(lo, hi)``, and shrinks it to ``R`` (Lanczos, i.e.
            antialiased): the photograph seen from further away, never enlarged (an enlargement
            would blur it). ``None``: plain ``R x R`` crops.
        color_jitter: strength of :func:`jitter_colors` (0: off; 0.1 is mild).
        tint_gray: probability that a grey crop (``R == G == B`` everywhere, as every crop of a
            grayscale photograph) gets a random colour tint (:func:`tint_gray`), before the colour
            jitter. 0: grey crops stay grey.
        procedural: fraction of the samples replaced by crops of colour dead-leaves images
            (:func:`hetvae.procedural.dead_leaves`) from a pool of ``procedural_pool`` images of
            side ``2 R``, each made on first use from ``(seed, k)``. 0: photographs only.
        cache_mb: decoded images (files, dataset rows) kept in memory, up to this many megabytes
            (MB = 2^20 bytes) per process (each ``DataLoader`` worker holds its own), least recently
            used dropped first. A crop needs the whole file decoded, so without a cache every sample
            decodes a photograph (tens of milliseconds for a large PNG) to keep a few thousand pixels.
            0: decode on every access (memory stays flat, however big the folder).
        check: how much of each image (file or dataset row) is read up front, here:

            - ``"full"`` (the default): every image is decoded, because a truncated file only fails
              when its pixel data is read. An unreadable image is skipped and logged by name (logger
              ``"hetvae.data"``); one with a side shorter than ``R`` is skipped with one
              ``UserWarning`` that counts them. Hours for a million photographs; needed by ``tiles``.
            - ``"header"``: only each image's header is read (its size, a fraction of a millisecond):
              an image smaller than ``R`` or without a readable header is skipped here, as above; one
              whose pixel data is damaged is found when first read, as in ``"lazy"``.
            - ``"lazy"``: nothing is read: the dataset is ready at once, however many images. An
              image that cannot be decoded, or is smaller than ``R``, is found when first read: one
              ``UserWarning`` names it (per process: each ``DataLoader`` worker warns once) and its
              samples take the crop of the next usable image, by the substitution rule below.

            ``skipped_unreadable`` and ``skipped_small`` list the images skipped; with ``"lazy"``
            (and ``"header"``'s damaged pixel data) they fill as the images are found, in the
            process that found them (a ``DataLoader`` worker's copy, not the main process's).
            If no image is usable, ``ValueError`` says why: here, or with ``"lazy"`` at the first
            read. In-memory images are always checked here.
        image_column: the column of a Hugging Face dataset that holds the images.

    Images decoded by the ``"full"`` check that fit in ``cache_mb`` are kept from then on; the
    others are decoded on access (and may enter the cache then). In-memory images are kept as given.

    An image that is unusable when read (an unreadable or small one first read by a ``"lazy"``
    dataset; or a file that became unusable after it was checked or read: deleted, truncated,
    corrupted, or, after a ``"full"`` check, replaced by an image of another size; only a file
    outside the cache, which is never read again) does not stop a run: its samples take the crop of
    the next usable image in order (``i + 1, i + 2, ...``, with the same random draws; a tile becomes
    that image's centre window), and one ``UserWarning`` per image names it. An image that was
    usable before is added to ``lost_during_run`` (and read again on its next access); one found
    unusable at its first read goes to ``skipped_unreadable`` / ``skipped_small`` (and is not read
    again in that process). If every image is unusable, ``ValueError`` says so ("every image became
    unusable", naming them). The substitute is a pure function of which images are unusable, so
    determinism holds.

    Determinism: the random crop, flip and augmentations of sample ``index`` are drawn from
    ``numpy.random.default_rng((seed, epoch, index))``, a pure function of those three numbers.
    They do not depend on the process, the worker, the global RNG state or the access order, so
    the same seed gives the same crops in one process and across ``DataLoader`` workers. Call
    ``set_epoch(epoch)`` before each epoch (like ``DistributedSampler``) to get fresh crops;
    workers receive the epoch when the ``DataLoader`` iterator is created, so do not combine it
    with ``persistent_workers=True``. Or index with ``(epoch, index)`` pairs: ``dataset[(e, i)]``
    is ``dataset[i]`` after ``set_epoch(e)``, so one loader, whose workers keep their decoded
    files and dead-leaves images, can serve every epoch (the trainer's does). The ``check`` mode
    decides which images count (a ``"lazy"`` dataset keeps its unusable images' indices, which
    substitutes fill; a ``"full"`` one drops them), so compare crops between datasets of one mode.
    """

    def __init__(
        self,
        sources: ImageSource | Sequence[ImageSource],
        *,
        resolution: int,
        random_crop: bool = True,
        random_flip: bool = True,
        seed: int = 0,
        tiles: bool = False,
        num_samples: int | None = None,
        rescale: tuple[float, float] | None = None,
        color_jitter: float = 0.0,
        tint_gray: float = 0.0,
        procedural: float = 0.0,
        procedural_pool: int = 64,
        cache_mb: float = 0.0,
        check: Check = "full",
        image_column: str = "image",
    ) -> None:
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if tiles and random_crop:
            raise ValueError("tiles=True is an evaluation mode and needs random_crop=False")
        if check not in ("full", "header", "lazy"):
            raise ValueError(f"check must be 'full', 'header' or 'lazy', got {check!r}")
        if tiles and check != "full":
            raise ValueError(f"tiles=True needs check='full' (the tile grid needs every image's size), got {check!r}")
        if num_samples is not None and (num_samples < 1 or tiles):
            raise ValueError("num_samples must be positive and cannot be combined with tiles=True")
        augment = rescale is not None or color_jitter > 0 or tint_gray > 0 or procedural > 0
        if augment and not random_crop:
            raise ValueError(
                "rescale, color_jitter, tint_gray and procedural are training augmentations and need random_crop=True"
            )
        if rescale is not None:
            lo, hi = (float(v) for v in rescale)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"rescale must be (lo, hi) with 0 < lo <= hi <= 1, got {tuple(rescale)}")
            rescale = (lo, hi)
        if not 0.0 <= color_jitter <= 1.0:
            raise ValueError(f"color_jitter must be in [0, 1], got {color_jitter}")
        if not 0.0 <= tint_gray <= 1.0:
            raise ValueError(f"tint_gray must be a probability in [0, 1], got {tint_gray}")
        if not 0.0 <= procedural <= 1.0:
            raise ValueError(f"procedural must be a fraction in [0, 1], got {procedural}")
        if procedural_pool < 1:
            raise ValueError(f"procedural_pool must be positive, got {procedural_pool}")
        if not (cache_mb >= 0.0 and math.isfinite(cache_mb)):
            raise ValueError(f"cache_mb must be a finite, non-negative number of megabytes, got {cache_mb}")
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = int(cache_mb * 2**20)
        self.rescale = rescale
        self.color_jitter = float(color_jitter)
        self.tint_gray = float(tint_gray)
        self.procedural = float(procedural)
        self.procedural_pool = int(procedural_pool)
        self._pool = ProceduralPool(seed, 2 * resolution)
        self.resolution = resolution
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.seed = seed
        self.tiles = tiles
        self.check = check
        self.augment = Augment(
            resolution=resolution, random_crop=random_crop, random_flip=random_flip,
            rescale=rescale, color_jitter=self.color_jitter, tint_gray=self.tint_gray,
        )
        """The crop-and-augment recipe of the training samples (:class:`Augment`)."""
        self.epoch = 0
        self.skipped_unreadable: list[str] = []
        self.skipped_small: list[str] = []
        self.lost_during_run: list[str] = []
        self._lost: set[int] = set()
        # the images: blocks of one kind (files, dataset rows, in-memory), entry g is block k's entry
        # g - starts[k]; image i of the dataset is entry kept[i] (kept=None: every entry)
        self._blocks = self._collect(sources, image_column)
        self._starts = np.cumsum([0] + [len(b) for b in self._blocks[:-1]]).tolist()
        self._sizes: np.ndarray | None = None  # (n, 2) heights and widths, after a "full" check
        self._kept: np.ndarray | None = None
        self._check()
        self._n = len(self._kept) if self._kept is not None else sum(len(b) for b in self._blocks)
        # per process: what reading each image found (in-memory ones are never read: always usable)
        self._state = bytearray([_USABLE if check == "full" else _UNKNOWN]) * self._n
        self._num_samples = num_samples
        # tile index -> (item, top, left), built once: len() and lookups stay O(1).
        self._tiles: list[tuple[int, int, int]] = []
        if tiles:
            for i, (height, width) in enumerate(self._sizes.tolist()):
                ny, nx = height // resolution, width // resolution
                top0 = (height - ny * resolution) // 2
                left0 = (width - nx * resolution) // 2
                self._tiles.extend(
                    (i, top0 + y * resolution, left0 + x * resolution) for y in range(ny) for x in range(nx)
                )

    @staticmethod
    def _collect(sources, image_column: str) -> list:
        """``sources`` as blocks of image files, dataset rows and in-memory images, in order."""
        single_pair = isinstance(sources, tuple) and len(sources) == 2 and isinstance(sources[1], np.ndarray)
        if isinstance(sources, (str, os.PathLike, np.ndarray, Image.Image)) or single_pair:
            sources = [sources]
        blocks: list = []
        pending_paths: list = []  # consecutive image paths go through list_images together

        def flush() -> None:
            if pending_paths:
                blocks.append(_Files(list_images(pending_paths)))
                pending_paths.clear()

        def arrays() -> _Arrays:
            if not blocks or not isinstance(blocks[-1], _Arrays):
                blocks.append(_Arrays())
            return blocks[-1]

        for source in sources:
            if isinstance(source, (str, os.PathLike)):
                kind = source_kind(source)
                if kind == "shards":
                    _refuse_shards(source)
                if kind in ("hf", "parquet"):
                    flush()
                    blocks.append(_Rows(hfdata.DatasetImages(source, image_column)))
                else:
                    pending_paths.append(source)
                continue
            flush()
            count = sum(len(b) for b in blocks)  # an unnamed image is named by its position
            if isinstance(source, tuple):
                name, array = source
                arrays().add(str(name), array)
            elif isinstance(source, Image.Image):
                arrays().add(f"image{count}", np.asarray(source.convert("RGB")))
            elif isinstance(source, np.ndarray):
                arrays().add(f"image{count}", source)
            else:
                raise TypeError(f"unsupported image source of type {type(source).__name__}")
        flush()
        if not blocks:
            raise ValueError("no images given")
        return blocks

    def _check(self) -> None:
        """Read what ``check`` asks of every image; keep the usable ones (``_kept``, ``_sizes``)."""
        r, n_total = self.resolution, sum(len(b) for b in self._blocks)
        if self.check == "lazy" and all(not isinstance(b, _Arrays) for b in self._blocks):
            return  # nothing to read, and nothing skipped: every entry is an image, until a read says otherwise
        kept: list[int] = []
        sizes: list[tuple[int, int]] = []
        for block, start in zip(self._blocks, self._starts):
            if self.check == "lazy" and not isinstance(block, _Arrays):
                kept.extend(range(start, start + len(block)))
                sizes.extend([(0, 0)] * len(block))
                continue
            for j in range(len(block)):
                decoded = None  # a "full" check's pixels: the cache may keep them
                if isinstance(block, _Arrays):
                    size = block.size(j)
                else:
                    try:
                        if self.check == "full":
                            decoded = block.read(j)
                            size = decoded.shape[:2]
                        else:
                            size = block.size(j)
                    except Exception as exc:  # decoders raise a zoo of types (OSError, SyntaxError, ...)
                        name = block.name(j)
                        logger.warning("skipping unreadable image %s: %s: %s", name, type(exc).__name__, exc)
                        self.skipped_unreadable.append(name)
                        continue
                if min(size) < r:
                    name = block.name(j)
                    logger.info("skipping %s: %dx%d is smaller than the crop", name, size[1], size[0])
                    self.skipped_small.append(name)
                    continue
                if decoded is not None:
                    self._remember(len(kept), decoded)
                kept.append(start + j)
                sizes.append(tuple(size))
        if self.skipped_small:
            shown = ", ".join(self.skipped_small[:5]) + (", ..." if len(self.skipped_small) > 5 else "")
            warnings.warn(
                f"skipped {len(self.skipped_small)} image(s) smaller than {r}x{r}: {shown}",
                UserWarning,
                stacklevel=3,
            )
        if not kept:
            raise ValueError(
                f"no usable image among {n_total}: {len(self.skipped_unreadable)} unreadable, "
                f"{len(self.skipped_small)} smaller than {r}x{r}"
            )
        if len(kept) < n_total:
            self._kept = np.asarray(kept, dtype=np.int64)
        if self.check == "full":
            self._sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)

    def _locate(self, i: int) -> tuple:
        """Image ``i`` as ``(block, index in the block)``."""
        g = int(self._kept[i]) if self._kept is not None else i
        k = bisect.bisect_right(self._starts, g) - 1
        return self._blocks[k], g - self._starts[k]

    def _name(self, i: int) -> str:
        block, j = self._locate(i)
        return block.name(j)

    @property
    def in_memory(self) -> bool:
        """Whether every image is held in memory (given as pixels), so no sample decodes a file."""
        return all(isinstance(b, _Arrays) for b in self._blocks)

    @property
    def names(self) -> list[str]:
        """Names of the images in use, in order: file paths, ``"<dataset>[<row>]"`` or given names.
        A ``"lazy"`` dataset lists every image, the unusable ones it has found included."""
        return [self._name(i) for i in range(self._n)]

    def set_epoch(self, epoch: int) -> None:
        """Select the random crops and flips of epoch ``epoch`` (see the class docstring)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.tiles:
            return len(self._tiles)
        return self._num_samples if self._num_samples is not None else self._n

    def _remember(self, i: int, pixels: np.ndarray) -> None:
        """Keep the decoded file of image ``i`` in the cache if it fits, dropping the least recently
        used ones to make room."""
        if pixels.nbytes > self._cache_limit:
            return
        while self._cache_bytes + pixels.nbytes > self._cache_limit:
            self._cache_bytes -= self._cache.popitem(last=False)[1].nbytes
        pixels.flags.writeable = False  # shared by every crop taken from it
        self._cache[i] = pixels
        self._cache_bytes += pixels.nbytes

    def _read(self, i: int) -> np.ndarray | None:
        """The pixels of image ``i``, or None (warned once) when it is unusable."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        state = self._state[i]
        if state == _UNUSABLE:  # found so at its first read: not read again
            return None
        block, j = self._locate(i)
        if isinstance(block, _Arrays):
            return block.read(j)
        small = False
        try:
            pixels = block.read(j)
        except Exception as exc:  # noqa: BLE001 - any decoder or OS failure; named in the warning
            problem = f"{type(exc).__name__}: {exc}"
        else:
            height, width = pixels.shape[:2]
            if self._sizes is not None and (height, width) != tuple(self._sizes[i]):
                problem = f"it changed on disk from {self._sizes[i][1]}x{self._sizes[i][0]} to {width}x{height}"
            elif min(height, width) < self.resolution:
                small = True
                problem = f"{width}x{height} is smaller than the {self.resolution}x{self.resolution} crop"
            else:
                self._state[i] = _USABLE
                self._remember(i, pixels)
                return pixels
        name = block.name(j)
        if state == _UNKNOWN:  # its first read
            self._state[i] = _UNUSABLE
            (self.skipped_small if small else self.skipped_unreadable).append(name)
            what = "image" if small else "unreadable image"
            logger.info("skipping %s %s: %s", what, name, problem)  # a run's log file names it too
            warnings.warn(
                f"skipping {what} {name} ({problem}); its samples use the next usable image's crops",
                UserWarning,
                stacklevel=4,
            )
        elif i not in self._lost:
            self._lost.add(i)
            self.lost_during_run.append(name)
            warnings.warn(
                f"image {name} became unusable during the run ({problem}); "
                "its samples use the next readable image's crops",
                UserWarning,
                stacklevel=4,
            )
        return None

    def _pixels(self, i: int) -> tuple[np.ndarray, int]:
        """The pixels of image ``i`` or, when it is unusable, of the next usable image
        (``i + 1, i + 2, ...``), and the index of the image used."""
        n = self._n
        for k in range(n):
            pixels = self._read((i + k) % n)
            if pixels is not None:
                return pixels, (i + k) % n
        shown = ", ".join(self._name(k) for k in range(min(n, 5))) + (", ..." if n > 5 else "")
        r = self.resolution
        raise ValueError(
            f"every image became unusable (unreadable, smaller than {r}x{r}, or changed during the run): "
            f"{n} images: {shown} ({len(self.skipped_unreadable)} unreadable and {len(self.skipped_small)} too small "
            f"when first read, {len(self.lost_during_run)} lost after a good read)"
        )

    def first_usable(self) -> int:
        """The index of the first usable image, reading images in order until one is (a single
        decode when the first one is, as in a folder of photographs): a cheap start-up check that a
        ``"lazy"`` dataset has something to crop, before a long run depends on it.

        Raises:
            ValueError: no image is usable ("every image became unusable", naming them).
        """
        return self._pixels(0)[1]

    def __getitem__(self, index: int | tuple[int, int]) -> torch.Tensor:
        """Sample ``index`` of the current epoch, or ``(epoch, index)``: that epoch's."""
        epoch = self.epoch
        if isinstance(index, tuple):
            epoch, index = index
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        r = self.resolution
        if self.tiles:
            i, top, left = self._tiles[index]
            pixels, used = self._pixels(i)
            if used != i:  # a substitute: its centre window
                top, left = (pixels.shape[0] - r) // 2, (pixels.shape[1] - r) // 2
            return to_unit_tensor(pixels[top : top + r, left : left + r])
        # evaluation crops draw nothing; every augmentation needs random_crop (checked in __init__)
        rng = np.random.default_rng((self.seed, epoch, index)) if self.random_crop or self.random_flip else None
        if self.procedural > 0 and rng.random() < self.procedural:
            pixels = self._procedural_image(int(rng.integers(self.procedural_pool)))
        else:
            pixels, _ = self._pixels(index % self._n)
        return self.augment(pixels, rng)

    def _procedural_image(self, k: int) -> np.ndarray:
        """Pool entry ``k``: a dead-leaves image of twice the crop side, a pure function of
        ``(seed, k)``, made on first use and kept (the crops, flips and jitter drawn from it vary)."""
        return self._pool[k]


def build_dataset(
    data: DataConfig,
    *,
    train: bool,
    seed: int = 0,
    split: Literal["all", "train", "test"] | None = None,
    check: Check | None = None,
) -> ImageDataset:
    """The dataset described by the ``data`` section of a config.

    ``data.path`` (a folder, image file, list file, Hugging Face dataset, or a list of them:
    :func:`source_kind`) is read when set, a dataset's images from ``data.image_column``; when it
    is ``None`` the embedded :func:`sample_images` of ``split`` are used, ``split`` defaulting to
    ``data.split`` for training and to ``"test"`` for evaluation (held-out photographs). Tar
    shards are refused with a ``ValueError``: the trainer streams them (``hetvae.shards``).

    ``train=True``: random crops / flips / rescaling / colour jitter / grey tint / procedural images as
    configured, ``data.samples_per_epoch`` samples per epoch, randomness fixed by ``seed`` (pass
    ``train.seed``). ``train=False``: deterministic,
    no flip; one centre crop per image, or every tile when ``data.eval_crop == "tiles"``.

    ``check`` (:class:`ImageDataset`) defaults to ``"lazy"`` for training (ready at once, however
    many images), ``"header"`` for centre crops (sizes read, so images smaller than the crop are
    left out, and a set without any usable image is a ``ValueError`` here) and ``"full"`` for tiles
    (the grid needs every image's decoded size).
    """
    sources = data.path if data.path is not None else sample_images(split or (data.split if train else "test"))
    if train:
        return ImageDataset(
            sources,
            resolution=data.resolution,
            random_crop=data.random_crop,
            random_flip=data.random_flip,
            seed=seed,
            num_samples=data.samples_per_epoch,
            rescale=tuple(data.rescale) if data.rescale is not None else None,
            color_jitter=data.color_jitter,
            tint_gray=data.tint_gray,
            procedural=data.procedural,
            cache_mb=data.cache_mb,
            check=check or "lazy",
            image_column=data.image_column,
        )
    tiles = data.eval_crop == "tiles"
    return ImageDataset(
        sources,
        resolution=data.resolution,
        random_crop=False,
        random_flip=False,
        seed=seed,
        tiles=tiles,
        cache_mb=data.cache_mb,
        check=check or ("full" if tiles else "header"),
        image_column=data.image_column,
    )
