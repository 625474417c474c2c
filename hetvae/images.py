"""Reading images: files, folders and list files (``.txt``) of photographs, scikit-image's bundled sample
photographs, and latents saved by a diffusion pipeline.

Images are ``(H, W, 3)`` uint8 RGB arrays when read (:func:`read_image`) and ``(3, H, W)`` float32
tensors in ``[-1, 1]`` (``x / 127.5 - 1``) once converted (:func:`to_tensor`), the range Stable
Diffusion's VAE works in. :func:`load_images` lists files up front and decodes one at a time
(:class:`ImageList`), skipping the files hetvae itself wrote.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import stat
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors import SafetensorError, safe_open
from torch import Tensor

from hetvae.outputs import is_hetvae_output
from hetvae.pickles import load_weights_only

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")

# ---------------------------------------------------------------------------------------------
# folders
# ---------------------------------------------------------------------------------------------


LIST_SUFFIX = ".txt"
"""A file with this extension (case-insensitive) given to :func:`list_images` lists image paths."""


def list_images(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Image files under ``paths`` (a folder, a file, a list file, or a list of these).

    Folders are searched recursively; a file is kept when its extension, compared
    case-insensitively, is one of :data:`IMAGE_EXTENSIONS` (png, jpg/jpeg, webp, bmp, tif/tiff).
    Hidden files and folders (name starting with ``.``, e.g. macOS ``._photo.jpg`` forks) are
    skipped. Only regular files (or links to them) are kept: a FIFO, device, socket or broken link
    with an image name is skipped with one ``UserWarning`` naming them (opening a FIFO would wait
    forever for a writer). Each folder's files are sorted by path; the result keeps the order of
    ``paths`` and drops duplicates. Nothing is decoded here: readability is checked by
    :class:`ImageDataset`.

    A ``.txt`` file is a list file (:func:`read_list_file`): the image files it names, one a line,
    in its order.

    Raises:
        FileNotFoundError: a path does not exist (the message names it).
        ValueError: a folder holds no image file, a list file names none, or a file given by name is
            not an image or not a regular file (the message names it and the accepted extensions).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: dict[Path, None] = {}  # an ordered set
    irregular: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"image path does not exist: {str(path)!r}")
        if not path.is_dir():
            if not path.is_file():
                raise ValueError(f"{str(path)!r} is not a regular file ({_file_kind(path)}); only image files are read")
            if path.suffix.lower() == LIST_SUFFIX:
                found.update((f, None) for f in read_list_file(path))
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise ValueError(
                    f"{str(path)!r} is not an image file; accepted extensions: {', '.join(IMAGE_EXTENSIONS)} "
                    f"(or {LIST_SUFFIX} for a file listing image paths)"
                )
            found[path] = None
            continue
        files = []
        # os.walk does not follow symlinked folders, so a link cycle cannot loop forever.
        for root, dirs, names in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for n in names:
                if n.startswith(".") or Path(n).suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                file = Path(root, n)
                (files if file.is_file() else irregular).append(file)
        if not files:
            raise ValueError(
                f"no image files in {str(path)!r} (searched recursively for "
                f"{', '.join(IMAGE_EXTENSIONS)}, case-insensitive)"
            )
        found.update((f, None) for f in sorted(files))
    if irregular:
        shown = ", ".join(f"{f} ({_file_kind(f)})" for f in irregular[:5]) + (", ..." if len(irregular) > 5 else "")
        warnings.warn(
            f"skipped {len(irregular)} image name(s) that are not a regular file: {shown}", UserWarning, stacklevel=2
        )
    return list(found)


def read_list_file(path: str | os.PathLike) -> list[Path]:
    """The image files a list file names: one path a line, a relative path taken relative to the
    list file's folder (``~`` expanded); blank lines and lines starting with ``#`` are ignored.

    The files keep the list's order (a file listed twice is kept once). Listed paths that are
    missing, not regular files or not image files (by :data:`IMAGE_EXTENSIONS`) are left out with
    one ``UserWarning`` that counts them and names the first few; nothing is decoded here.

    Raises:
        ValueError: the list names no path, or none of its paths is a usable image file (the
            message names the list file).
    """
    path = Path(path).expanduser()
    if not path.is_file():  # a FIFO would block the read
        raise ValueError(f"list file {str(path)!r} is not a regular file ({_file_kind(path)})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"list file {str(path)!r} is not UTF-8 text ({exc}); it should list image paths one a line") from exc
    entries = [line.strip() for line in text.splitlines()]
    entries = [e for e in entries if e and not e.startswith("#")]
    if not entries:
        raise ValueError(f"list file {str(path)!r} lists no image path (one a line; blank lines and # comments are ignored)")
    found: dict[Path, None] = {}
    bad: list[str] = []
    for entry in entries:
        file = Path(entry).expanduser()
        if not file.is_absolute():
            file = path.parent / file
        if file.suffix.lower() not in IMAGE_EXTENSIONS:
            bad.append(f"{file} (not an image file)")
        elif not file.exists():
            bad.append(f"{file} ({'a broken link' if file.is_symlink() else 'missing'})")
        elif not file.is_file():
            bad.append(f"{file} ({_file_kind(file)})")
        else:
            found[file] = None
    if not found:
        raise ValueError(
            f"list file {str(path)!r}: none of its {len(entries)} listed path(s) is an image file "
            f"({', '.join(IMAGE_EXTENSIONS)}) that exists: {', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}"
        )
    if bad:
        warnings.warn(
            f"list file {str(path)!r}: left out {len(bad)} of {len(entries)} listed path(s) that are missing or "
            f"not image files: {', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}",
            UserWarning,
            stacklevel=3,
        )
    return list(found)


def _file_kind(path: Path) -> str:
    """What ``path`` is, for messages: "a FIFO", "a folder", "a broken link", ..."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return "a broken link" if path.is_symlink() else "unreadable"
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return kind
    return "not a regular file"


def to_rgb_uint8(array: np.ndarray, name: str) -> np.ndarray:
    """``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` uint8 -> ``(H, W, 3)`` uint8."""
    if array.dtype != np.uint8:
        raise ValueError(f"image {name!r}: expected uint8 pixels, got {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"image {name!r}: expected (H, W), (H, W, 1|3|4), got shape {array.shape}")
    if array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    return array[:, :, :3]  # alpha dropped, as PIL's convert("RGB") does


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode ``path`` into an ``(H, W, 3)`` uint8 RGB array.

    The EXIF orientation is applied (phone photographs are stored sideways). Grayscale,
    palette, CMYK and RGBA images are converted to RGB (alpha is dropped, not composited).
    Only the first frame of a multi-frame file is read. Pixels other than 8-bit map by their range:

    - 16-bit integers (PNG, TIFF): ``0..65535 -> 0..255`` (``round(v / 257)``); 16-bit RGB(A) PNGs
      keep their high byte (Pillow's decoder);
    - floats (TIFF): read only in ``0..1``, scaled by 255 and rounded; NaN or inf anywhere, or any
      value outside ``0..1`` (an HDR or 0..255 float image), is refused: there is no safe guess;
    - 32-bit integers (TIFF): refused, they have no standard white level.

    Only a regular file is opened (a FIFO named ``x.png`` would block forever).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a regular file, not decodable (truncated, corrupt, not an image), or pixels
            refused by the rules above; the message names the file and the problem.
    """
    path = Path(path)
    with _open_regular(path) as file:
        return decode_image(file, str(path))


_EXIF_ORIENTATION = 0x0112


def decode_image(file: BinaryIO | bytes, name: str) -> np.ndarray:
    """Decode an encoded image (an open binary file or its bytes, e.g. a tar shard's member or a
    dataset's cell) into an ``(H, W, 3)`` uint8 RGB array, by the rules of :func:`read_image`.

    Raises:
        ValueError: not decodable, or pixels refused; the message names ``name`` and the problem.
    """
    if isinstance(file, (bytes, bytearray, memoryview)):
        file = io.BytesIO(file)
    try:
        with Image.open(file) as im:
            im.load()
            # TIFF says how many bits a sample has; Pillow widens 8/16-bit ints to mode "I" there
            bits = max(getattr(im, "tag_v2", {}).get(258, (0,)) or (0,))
            # a copy only where there is something to do: each copy of a decoded photograph costs
            # about as much as a third of its decode (768x512 JPEGs decode 1.8x faster without them)
            if im.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                im = ImageOps.exif_transpose(im)
            mode = im.mode
            if mode == "F" or mode.startswith("I"):
                wide = np.asarray(im)
            else:
                return np.asarray(im if mode == "RGB" else im.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # decoders raise a zoo of types (OSError, SyntaxError, struct.error, ...)
        raise ValueError(f"cannot read image {name!r}: {type(exc).__name__}: {exc}") from exc
    return to_rgb_uint8(_wide_to_uint8(wide, mode, bits, name), name)


def image_size(file: str | os.PathLike | bytes, name: str | None = None) -> tuple[int, int]:
    """``(height, width)`` of an image file (a path, or its bytes) read from its header alone,
    without decoding the pixels: a fraction of a millisecond where a decode takes tens.

    The size is the stored one, before the EXIF orientation, which may swap the two sides
    (:func:`read_image` applies it); the shorter side is the same either way. A file whose pixel
    data is damaged may pass here and fail to decode.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: not a regular file, or no image header Pillow knows; the message names the file.
    """
    if isinstance(file, (bytes, bytearray, memoryview)):
        name = name or "<bytes>"
        opened = contextlib.nullcontext(io.BytesIO(file))
    else:
        name = name or str(file)
        opened = _open_regular(Path(file))
    with opened as handle:
        try:
            with Image.open(handle) as im:
                width, height = im.size
        except Exception as exc:  # decoders raise a zoo of types
            raise ValueError(f"cannot read image {name!r}: {type(exc).__name__}: {exc}") from exc
    return height, width


def _open_regular(path: Path):
    """``path`` opened for binary reading, refused unless it is a regular file. The check is on the
    open descriptor, so a file swapped for a FIFO after listing cannot block the open or the read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:  # a socket (ENXIO), no permission, ...
        raise ValueError(f"cannot open image {str(path)!r}: {exc.strerror or exc}") from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else _file_kind(path)
            raise ValueError(f"{str(path)!r} is not a regular file ({kind}); only image files are read")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _wide_to_uint8(wide: np.ndarray, mode: str, bits: int, name: str) -> np.ndarray:
    """Float (mode ``F``) or 16/32-bit integer (``I``, ``I;16*``) pixels as uint8, by the rules of
    :func:`read_image`; ``bits`` is the TIFF sample size (0 when unknown)."""
    values = wide.astype(np.float64)
    if mode == "F":
        nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
        if nan or inf:
            found = " and ".join(t for t in (f"{nan} NaN" * bool(nan), f"{inf} infinite (inf)" * bool(inf)) if t)
            raise ValueError(f"image {name!r}: {found} pixel value(s); a float image must hold finite values in 0..1")
        lo, hi = float(values.min()), float(values.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"image {name!r}: float pixels span [{lo:.6g}, {hi:.6g}]; float images are read only in 0..1 "
                "(scaled by 255): save it as 8- or 16-bit integers, or scale it to 0..1"
            )
        return np.rint(values * 255.0).astype(np.uint8)
    if mode == "I" and bits > 16:
        raise ValueError(
            f"image {name!r}: {bits}-bit integer pixels have no standard white level; "
            "save it as 8- or 16-bit integers, or as floats in 0..1"
        )
    lo, hi = float(values.min()), float(values.max())
    if lo < 0.0 or hi > 65535.0:
        raise ValueError(f"image {name!r}: integer pixels span [{lo:g}, {hi:g}]; 16-bit images hold 0..65535")
    # PIL's convert("RGB") clips 16-bit values at 255 instead of scaling them.
    return np.rint(values / 257.0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# scikit-image sample photographs
# ---------------------------------------------------------------------------------------------

# name -> where it goes. Every name is a skimage.data function whose file ships inside the wheel (no
# pooch download), except "motorcycle", the left view of skimage.data.stereo_motorcycle(); the right
# view is left out because it is a near-duplicate that would leak across the split.
#
# The held-out ("test") set is colour photographs only: the whole motorcycle photograph, and the
# right-hand quarter of the four other colour photographs ("region" entries: columns left of
# HOLDOUT_FRACTION of the width train, the rest is held out; the two parts never overlap, so no
# training crop sees a held-out pixel). Grayscale photographs train as they are (R = G = B): they
# teach luminance structure and texture; colour comes from the colour photographs and, when the
# config asks for it, procedural dead-leaves images (hetvae.procedural).
_SAMPLE_SPLIT: dict[str, Literal["train", "test", "region"]] = {
    "astronaut": "region",            # 512x512 RGB, portrait with flag and suit
    "chelsea": "region",              # 300x451 RGB, cat (fur, whiskers)
    "coffee": "region",               # 400x600 RGB, cup on a table
    "rocket": "region",               # 427x640 RGB, launch pad, sky
    "motorcycle": "test",             # 500x741 RGB, motorcycle in a workshop
    "immunohistochemistry": "train",  # 512x512 RGB, stained tissue micrograph
    "retina": "train",                # 1411x1411 RGB, fundus photograph
    "hubble_deep_field": "train",     # 872x1000 RGB, galaxies on black
    "camera": "train",                # 512x512 gray, cameraman
    "moon": "train",                  # 512x512 gray, lunar surface
    "clock": "train",                 # 300x400 gray, motion-blurred clock
    "coins": "train",                 # 303x384 gray, coins on a flat background
    "brick": "train",                 # 512x512 gray, brick wall texture
    "grass": "train",                 # 512x512 gray, texture
    "gravel": "train",                # 512x512 gray, texture
    "cell": "train",                  # 660x550 gray, cell in saline (microscope)
}
HOLDOUT_FRACTION = 0.75
"""Region entries of the sample split: columns ``[0, 0.75 W)`` train, ``[0.75 W, W)`` are held out."""

SAMPLE_NAMES: tuple[str, ...] = tuple(_SAMPLE_SPLIT)


@functools.lru_cache(maxsize=None)
def _load_sample(name: str) -> np.ndarray:
    import skimage.data  # optional at run time: ~0.3 s, and only the embedded default needs it

    array = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    array = to_rgb_uint8(np.asarray(array), name)
    array.flags.writeable = False  # the cached copy is shared
    return array


def sample_images(split: Literal["all", "train", "test"] = "all") -> list[tuple[str, np.ndarray]]:
    """scikit-image's bundled sample photographs, as ``[(name, (H, W, 3) uint8 RGB), ...]``.

    Sixteen natural photographs (no synthetic images such as checkerboard or binary blobs), all
    stored inside the scikit-image package, so nothing is downloaded. Grayscale ones are repeated
    to three channels. Every image (and every part of one) is at least 110 pixels on each side.

    The split is fixed by name and region, and the held-out part is never in the training split:

    - ``test``: colour photographs only: ``motorcycle`` (left view of ``stereo_motorcycle``) whole,
      and the right-hand quarter (:data:`HOLDOUT_FRACTION`) of astronaut, chelsea, coffee and
      rocket, named ``"<name>[right]"``;
    - ``train``: the left three quarters of those four (``"<name>[left]"``) and every other
      photograph: immunohistochemistry, retina, hubble_deep_field (colour), camera, moon, clock,
      coins, brick, grass, gravel, cell (grayscale).

    ``"all"`` returns the sixteen whole photographs in the order of :data:`SAMPLE_NAMES` (no held-out
    part: for training a model that will only be judged on other images). Each call returns fresh
    (writable) copies.
    """
    if split not in ("all", "train", "test"):
        raise ValueError(f"split must be one of 'all', 'train', 'test', got {split!r}")
    out = []
    for name, where in _SAMPLE_SPLIT.items():
        if split == "all":
            out.append((name, _load_sample(name).copy()))
        elif where == "region":
            image = _load_sample(name)
            cut = int(round(image.shape[1] * HOLDOUT_FRACTION))
            part = image[:, :cut] if split == "train" else image[:, cut:]
            out.append((f"{name}[{'left' if split == 'train' else 'right'}]", part.copy()))
        elif where == split:
            out.append((name, _load_sample(name).copy()))
    return out


CALIBRATION_PHOTOS = Path(__file__).parent / "calibration_photos"
"""The photographs ``hetvae calibrate`` fits on without ``--images``: unseen everyday colour
photographs shipped with the package (their sources and licences: ``CREDITS.md`` there; how the
set was chosen: docs/results.md, "Calibration")."""


def calibration_photos() -> list[Path]:
    """The files of :data:`CALIBRATION_PHOTOS`, sorted."""
    files = sorted(p for p in CALIBRATION_PHOTOS.glob("*.jpg"))
    if not files:
        raise FileNotFoundError(
            f"the shipped calibration photographs are missing from {CALIBRATION_PHOTOS} (a broken install?): "
            "reinstall hetvae or pass --images"
        )
    return files


def to_tensor(image) -> Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, H, W)`` float32 in [-1, 1]."""
    return torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 127.5 - 1.0  # copy: PIL arrays are read-only


class ImageList(Sequence):
    """Images listed up front and decoded one at a time: ``images[i]`` and iteration give
    ``(name, (3, H, W) float32 in [-1, 1])``, read from disk on each access.

    ``names``: each file's path relative to the folder all files share (``a/x.png``, with its
    extension), unique per file; the sample photographs' names for the built-in images.
    ``sources``: the files (or sample names). ``skipped``: files left out because hetvae wrote them.
    """

    def __init__(self, names: list[str], sources: list, read: Callable[[int], Tensor], skipped=()) -> None:
        self.names, self.sources, self._read, self.skipped = list(names), list(sources), read, list(skipped)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.names[index], self.load(index)

    def load(self, index: int) -> Tensor:
        return self._read(index)


def relative_names(files: list[Path]) -> list[str]:
    """Each file's path relative to the deepest folder holding them all, ``/``-separated."""
    absolute = [Path(os.path.abspath(f)) for f in files]
    root = Path(os.path.commonpath([str(f.parent) for f in absolute]))
    return [f.relative_to(root).as_posix() for f in absolute]


def split_hetvae_outputs(paths) -> tuple[list, list]:
    """``(others, ours)``: ``paths`` in order, split into the files hetvae did not write and those
    it did (:func:`hetvae.outputs.is_hetvae_output`: panels, scale maps, ``*_maps.safetensors``),
    which no command reads back as an input."""
    others, ours = [], []
    for path in paths:
        (ours if is_hetvae_output(path) else others).append(path)
    return others, ours


def load_images(paths: str | Path | list | None = None) -> ImageList:
    """An :class:`ImageList` of files / folders (recursive), or, with ``None``, of scikit-image's
    held-out sample photographs (the ``"test"`` split training never sees).

    Nothing is decoded here. A file reached twice (two arguments, a link) is listed once, and files
    hetvae wrote (panels, scale maps: :func:`is_hetvae_output`) are skipped, so outputs written next
    to the images are never read back as images. An unreadable file raises ``ValueError`` naming it
    when it is read.
    """
    if paths is None:
        samples = sample_images("test")
        return ImageList([n for n, _ in samples], [n for n, _ in samples], lambda i: to_tensor(samples[i][1]))
    unique: dict[str, Path] = {}
    for file in list_images(paths):
        unique.setdefault(os.path.realpath(file), file)
    files, skipped = split_hetvae_outputs(unique.values())
    if not files:
        raise ValueError(
            f"no images to read in {paths}: all {len(skipped)} image file(s) there were written by hetvae "
            f"(e.g. {skipped[0]})"
        )

    def read(i: int) -> Tensor:
        try:
            return to_tensor(read_image(files[i]))
        except Exception as error:  # name the file: PIL's messages often do not
            raise ValueError(f"cannot read image {files[i]}: {error}") from error

    return ImageList(relative_names(files), files, read, skipped)


LATENT_SUFFIXES = (".safetensors", ".pt")
"""Files ``hetvae uncertainty`` reads as latents rather than images."""
LATENT_KEY = "latents"


def is_latent_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in LATENT_SUFFIXES


def _read_latent_tensor(file: Path) -> Tensor:
    """The one tensor of ``file`` (or the one named ``latents``); ``ValueError`` naming the file."""
    if not file.is_file():
        raise FileNotFoundError(f"latents {file}: no such file" + (" (a folder?)" if file.exists() else ""))
    if file.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                keys = list(f.keys())
                name = LATENT_KEY if LATENT_KEY in keys else keys[0] if len(keys) == 1 else None
                tensors = {name: f.get_tensor(name)} if name is not None else {}
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"latents {file}: cannot read the safetensors file, it is truncated or corrupt ({e})") from e
    else:
        try:
            obj = load_weights_only(file)
        except ValueError as e:  # UnsafePickleError included: refused as code, or damaged
            raise ValueError(
                f"latents {file}: cannot load it with torch.load(weights_only=True), which reads only tensors and "
                f"plain containers, never code: {e}"
            ) from e
        if isinstance(obj, Tensor):
            return obj
        if not isinstance(obj, dict):
            raise ValueError(f"latents {file}: expected a tensor or a dict of tensors, found a {type(obj).__name__}")
        keys = list(obj)
        name = LATENT_KEY if LATENT_KEY in obj else keys[0] if len(keys) == 1 else None
        tensors = {name: obj[name]} if name is not None else {}
    if not tensors:
        raise ValueError(
            f"latents {file}: expected one tensor or one named {LATENT_KEY!r}, found "
            f"{len(keys)} ({', '.join(map(repr, keys[:5]))}{', ...' if len(keys) > 5 else ''})"
        )
    (tensor,) = tensors.values()
    if not isinstance(tensor, Tensor):
        raise ValueError(f"latents {file}: {name!r} is a {type(tensor).__name__}, not a tensor")
    return tensor


def load_latents(path: str | Path, config, scaled: bool = False) -> Tensor:
    """Latents ``(B, C, h, w)`` from a ``.safetensors`` file (its one tensor, or the one named
    ``latents``) or a ``.pt`` file (a tensor, or such a dict; read with
    ``torch.load(weights_only=True)``), as float32, unscaled for ``AutoencoderKL.decode``.

    ``scaled``: the latents are a diffusion pipeline's (``output_type="latent"``) and are unscaled
    as diffusers' pipelines do before decoding: ``z / scaling_factor + shift_factor`` with the
    model's ``config``, or ``z * latents_std / scaling_factor + latents_mean`` when the config has
    ``latents_mean`` and ``latents_std``. ``C`` must be ``config.latent_channels``. Every problem is
    a ``ValueError`` naming the file (``FileNotFoundError`` for a missing one).
    """
    file = Path(path).expanduser()
    z = _read_latent_tensor(file)
    channels = config.latent_channels
    shape = tuple(z.shape)
    if not z.is_floating_point():
        raise ValueError(f"latents {file}: expected floating-point values, got {z.dtype}")
    if z.ndim != 4 or z.shape[1] != channels or z.numel() == 0:
        raise ValueError(
            f"latents {file}: shape {shape}, expected (B, {channels}, h, w): the model has latent_channels={channels}"
            + (" (a single latent needs its batch dimension: z[None])" if z.ndim == 3 and z.shape[0] == channels else "")
        )
    z = z.float()
    if not torch.isfinite(z).all():
        raise ValueError(f"latents {file}: {int((~torch.isfinite(z)).sum())} value(s) are NaN or infinite")
    if scaled:
        if config.latents_mean is not None and config.latents_std is not None:
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1)
            z = z * std / config.scaling_factor + mean
        else:
            z = z / config.scaling_factor + config.shift_factor
    return z
