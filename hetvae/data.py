"""The training data: random crops of photographs with augmentations (rescaling, flips, colour
jitter, tints of grayscale crops, procedural dead-leaves images), as a map-style dataset.

Everything yields float tensors ``(3, R, R)`` in ``[-1, 1]`` (``x / 127.5 - 1`` of 8-bit RGB),
the range Stable Diffusion's VAE is trained on.

Images are *cropped*, never resized: a resize low-pass filters the picture and would change the
very pixel statistics (noise, texture, edges) the per-pixel log-scale is meant to model.

With no data path the library trains on :func:`sample_images`, photographs that ship inside the
scikit-image wheel, so a fresh install has real images and needs no download.
"""

from __future__ import annotations

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

from hetvae.config import DataConfig
from hetvae.images import list_images, read_image, sample_images, to_rgb_uint8
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


@dataclass(frozen=True)
class _Item:
    name: str
    height: int
    width: int
    path: Path | None = None  # decoded on access, unless kept in the dataset's cache
    pixels: np.ndarray | None = None  # in-memory image


ImageSource = str | os.PathLike | np.ndarray | Image.Image | tuple[str, np.ndarray]


class ImageDataset(torch.utils.data.Dataset):
    """Square crops of images as ``(3, R, R)`` float32 tensors in ``[-1, 1]``.

    Args:
        sources: a folder or image file, or a list of folders / files / in-memory images. An
            in-memory image is a ``(name, array)`` pair (what :func:`sample_images` returns), a
            bare uint8 array ``(H, W)`` / ``(H, W, 1|3|4)``, or a PIL image.
        resolution: crop side ``R`` in pixels.
        random_crop: a uniformly random ``R x R`` window; ``False``: the centre window.
        random_flip: a horizontal flip with probability 1/2.
        seed: with ``set_epoch`` and the index, fixes every random choice (see below).
        tiles: evaluation mode (needs ``random_crop=False``): every image yields all its
            non-overlapping ``R x R`` tiles, row by row, the grid centred in the image, instead of
            one centre crop; ``len()`` is the total tile count.
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
        cache_mb: decoded image files kept in memory, up to this many megabytes (MB = 2^20
            bytes) per process (each ``DataLoader`` worker holds its own), least recently used
            dropped first. A crop needs the whole file decoded, so without a cache every sample
            decodes a photograph (tens of milliseconds for a large PNG) to keep a few thousand pixels.
            0: decode on every access (memory stays flat, however big the folder).

    Images are checked once, here: every file is fully decoded, because a truncated file only
    fails when its pixel data is read and a training run should not die on it hours in. An
    unreadable file is skipped and logged by name (logger ``"hetvae.data"``); an image with a side
    shorter than ``R`` is skipped with one ``UserWarning`` that counts them. Their names are kept
    in ``skipped_unreadable`` and ``skipped_small``. If no image is left, ``ValueError`` says why.
    The decoded files that fit in ``cache_mb`` are kept from that check on; the others are decoded
    again on access (and may enter the cache then). In-memory images are kept as given.

    A file that becomes unusable later (deleted, truncated, corrupted, or replaced by an image of
    another size; only a file outside the cache, which is never read again) does not stop a run:
    its samples take the crop of the next readable image in
    order (``i + 1, i + 2, ...``, with the same random draws; a tile becomes that image's centre
    window), one ``UserWarning`` per file names it (per process: each ``DataLoader`` worker warns
    once), and its name is added to ``lost_during_run``. If every image is unusable, ``ValueError``
    says so. The substitute is a pure function of which files are unusable, so determinism holds.

    Determinism: the random crop, flip and augmentations of sample ``index`` are drawn from
    ``numpy.random.default_rng((seed, epoch, index))``, a pure function of those three numbers.
    They do not depend on the process, the worker, the global RNG state or the access order, so
    the same seed gives the same crops in one process and across ``DataLoader`` workers. Call
    ``set_epoch(epoch)`` before each epoch (like ``DistributedSampler``) to get fresh crops;
    workers receive the epoch when the ``DataLoader`` iterator is created, so do not combine it
    with ``persistent_workers=True``. Or index with ``(epoch, index)`` pairs: ``dataset[(e, i)]``
    is ``dataset[i]`` after ``set_epoch(e)``, so one loader, whose workers keep their decoded
    files and dead-leaves images, can serve every epoch (the trainer's does).
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
    ) -> None:
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if tiles and random_crop:
            raise ValueError("tiles=True is an evaluation mode and needs random_crop=False")
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
        self._pool: dict[int, np.ndarray] = {}
        self.resolution = resolution
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.seed = seed
        self.tiles = tiles
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
        self._items = self._check(self._collect(sources))
        self._num_samples = num_samples
        # tile index -> (item, top, left), built once: len() and lookups stay O(1).
        self._tiles: list[tuple[int, int, int]] = []
        if tiles:
            for i, item in enumerate(self._items):
                ny, nx = item.height // resolution, item.width // resolution
                top0 = (item.height - ny * resolution) // 2
                left0 = (item.width - nx * resolution) // 2
                self._tiles.extend(
                    (i, top0 + y * resolution, left0 + x * resolution) for y in range(ny) for x in range(nx)
                )

    @staticmethod
    def _collect(sources) -> list:
        single_pair = isinstance(sources, tuple) and len(sources) == 2 and isinstance(sources[1], np.ndarray)
        if isinstance(sources, (str, os.PathLike, np.ndarray, Image.Image)) or single_pair:
            sources = [sources]
        collected: list = []
        pending_paths: list = []  # consecutive paths go through list_images together
        for source in sources:
            if isinstance(source, (str, os.PathLike)):
                pending_paths.append(source)
                continue
            if pending_paths:
                collected.extend(list_images(pending_paths))
                pending_paths = []
            if isinstance(source, tuple):
                name, array = source
                collected.append((str(name), array))
            elif isinstance(source, Image.Image):
                collected.append((f"image{len(collected)}", np.asarray(source.convert("RGB"))))
            elif isinstance(source, np.ndarray):
                collected.append((f"image{len(collected)}", source))
            else:
                raise TypeError(f"unsupported image source of type {type(source).__name__}")
        if pending_paths:
            collected.extend(list_images(pending_paths))
        if not collected:
            raise ValueError("no images given")
        return collected

    def _check(self, collected: list) -> list[_Item]:
        items = []
        for entry in collected:
            decoded = None  # a file's pixels, decoded here anyway: the cache may keep them
            if isinstance(entry, Path):
                try:
                    decoded = read_image(entry)
                except Exception as exc:  # decoders raise a zoo of types (OSError, SyntaxError, ...)
                    logger.warning("skipping unreadable image %s: %s: %s", entry, type(exc).__name__, exc)
                    self.skipped_unreadable.append(str(entry))
                    continue
                item = _Item(name=str(entry), height=decoded.shape[0], width=decoded.shape[1], path=entry)
            else:
                name, array = entry
                pixels = to_rgb_uint8(np.asarray(array), name)
                item = _Item(name=name, height=pixels.shape[0], width=pixels.shape[1], pixels=pixels)
            if min(item.height, item.width) < self.resolution:
                logger.info("skipping %s: %dx%d is smaller than the crop", item.name, item.width, item.height)
                self.skipped_small.append(item.name)
                continue
            if decoded is not None:
                self._remember(len(items), decoded)
            items.append(item)
        if self.skipped_small:
            shown = ", ".join(self.skipped_small[:5]) + (", ..." if len(self.skipped_small) > 5 else "")
            warnings.warn(
                f"skipped {len(self.skipped_small)} image(s) smaller than "
                f"{self.resolution}x{self.resolution}: {shown}",
                UserWarning,
                stacklevel=3,
            )
        if not items:
            raise ValueError(
                f"no usable image among {len(collected)}: {len(self.skipped_unreadable)} unreadable, "
                f"{len(self.skipped_small)} smaller than {self.resolution}x{self.resolution}"
            )
        return items

    @property
    def in_memory(self) -> bool:
        """Whether every image is held in memory (given as pixels), so no sample decodes a file."""
        return all(item.pixels is not None for item in self._items)

    @property
    def names(self) -> list[str]:
        """Names (file paths or given names) of the images in use, in order."""
        return [item.name for item in self._items]

    def set_epoch(self, epoch: int) -> None:
        """Select the random crops and flips of epoch ``epoch`` (see the class docstring)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.tiles:
            return len(self._tiles)
        return self._num_samples if self._num_samples is not None else len(self._items)

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
        """The pixels of image ``i``, or None (warned once) when its file has become unusable."""
        item = self._items[i]
        if item.pixels is not None:
            return item.pixels
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        try:
            pixels = read_image(item.path)
        except Exception as exc:  # noqa: BLE001 - any decoder or OS failure; named in the warning
            problem = f"{type(exc).__name__}: {exc}"
        else:
            if pixels.shape[:2] == (item.height, item.width):
                self._remember(i, pixels)
                return pixels
            problem = f"it changed on disk from {item.width}x{item.height} to {pixels.shape[1]}x{pixels.shape[0]}"
        if i not in self._lost:
            self._lost.add(i)
            self.lost_during_run.append(item.name)
            warnings.warn(
                f"image {item.name} became unusable during the run ({problem}); "
                "its samples use the next readable image's crops",
                UserWarning,
                stacklevel=4,
            )
        return None

    def _pixels(self, i: int) -> tuple[np.ndarray, int]:
        """The pixels of image ``i`` or, when its file has become unusable, of the next readable image
        (``i + 1, i + 2, ...``), and the index of the image used."""
        n = len(self._items)
        for k in range(n):
            pixels = self._read((i + k) % n)
            if pixels is not None:
                return pixels, (i + k) % n
        shown = ", ".join(self.names[:5]) + (", ..." if n > 5 else "")
        raise ValueError(f"every image became unusable (unreadable or changed) during the run ({n} images: {shown})")

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
            pixels, _ = self._pixels(index % len(self._items))
        return self.augment(pixels, rng)

    def _procedural_image(self, k: int) -> np.ndarray:
        """Pool entry ``k``: a dead-leaves image of twice the crop side, a pure function of
        ``(seed, k)``, made on first use and kept (the crops, flips and jitter drawn from it vary)."""
        if k not in self._pool:
            image = dead_leaves(2 * self.resolution, np.random.default_rng((self.seed, 0x5EED, k)))
            image.flags.writeable = False
            self._pool[k] = image
        return self._pool[k]


def build_dataset(
    data: DataConfig,
    *,
    train: bool,
    seed: int = 0,
    split: Literal["all", "train", "test"] | None = None,
) -> ImageDataset:
    """The dataset described by the ``data`` section of a config.

    ``data.path`` (a folder, file or list of them) is read when set; when it is ``None`` the
    embedded :func:`sample_images` of ``split`` are used, ``split`` defaulting to ``data.split``
    for training and to ``"test"`` for evaluation (held-out photographs).

    ``train=True``: random crops / flips / rescaling / colour jitter / grey tint / procedural images as
    configured, ``data.samples_per_epoch`` samples per epoch, randomness fixed by ``seed`` (pass
    ``train.seed``). ``train=False``: deterministic,
    no flip; one centre crop per image, or every tile when ``data.eval_crop == "tiles"``.
    """
    if data.path is not None:
        sources = data.path
    else:
        sources = sample_images(split or (data.split if train else "test"))
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
        )
    return ImageDataset(
        sources,
        resolution=data.resolution,
        random_crop=False,
        random_flip=False,
        seed=seed,
        tiles=data.eval_crop == "tiles",
        cache_mb=data.cache_mb,
    )
