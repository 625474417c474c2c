"""Issue 13 for the image reader and the dataset: hostile files give correct pixels or a ValueError
naming the file, never a raw traceback, a hang or a silent coercion."""

import os
import threading
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from hetvae.data import ImageDataset
from hetvae.images import list_images, read_image

R = 16
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")


def _photo(h, w, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _folder(tmp_path, n=3, size=24):
    for i in range(n):
        Image.fromarray(_photo(size, size + i, i)).save(tmp_path / f"img{i}.png")
    return tmp_path


def _within(seconds, fn, *args):
    """``fn(*args)`` run in a daemon thread: its result or exception, or a failure if it hangs."""
    box = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)} hung for {seconds} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


# --- item 6: an image that becomes unreadable mid-run ------------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "truncate", "delete", "resize"])
def test_image_lost_mid_run_is_substituted_with_one_warning(tmp_path, damage):
    folder = _folder(tmp_path)
    kw = dict(resolution=R, seed=1, num_samples=9)
    ds, twin = ImageDataset(folder, **kw), ImageDataset(folder, **kw)
    before = [ds[i] for i in range(len(ds))]
    victim = folder / "img1.png"
    if damage == "garbage":
        victim.write_bytes(b"\x89PNG\r\n\x1a\n not an image any more")
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:60])
    elif damage == "delete":
        victim.unlink()
    else:  # replaced by an image of another size
        Image.fromarray(_photo(40, 40, 9)).save(victim)
    with pytest.warns(UserWarning, match=r"img1\.png") as record:
        after = [ds[i] for i in range(len(ds))]
        again = [ds[i] for i in range(len(ds))]  # no second warning for the same file
    assert sum("img1.png" in str(w.message) for w in record) == 1
    assert ds.lost_during_run == [str(victim)]
    for i in range(len(ds)):
        assert after[i].shape == (3, R, R) and torch.equal(after[i], again[i])
        if i % 3 != 1:  # the other images' crops are untouched
            assert torch.equal(after[i], before[i])
    # deterministic: another dataset over the same files gives the same substitutes
    with pytest.warns(UserWarning, match=r"img1\.png"):
        assert all(torch.equal(twin[i], after[i]) for i in range(len(ds)))


def test_substitute_is_the_next_readable_image(tmp_path):
    folder = _folder(tmp_path)
    ds = ImageDataset(folder, resolution=R, random_crop=False, random_flip=False)
    (folder / "img1.png").unlink()
    with pytest.warns(UserWarning, match="img1.png"):
        assert torch.equal(ds[1], ds[2])


def test_tiles_of_a_lost_image_are_substituted(tmp_path):
    folder = _folder(tmp_path, n=2, size=32)
    ds = ImageDataset(folder, resolution=R, random_crop=False, random_flip=False, tiles=True)
    (folder / "img0.png").unlink()
    with pytest.warns(UserWarning, match="img0.png"):
        tiles = [ds[i] for i in range(len(ds))]
    assert all(t.shape == (3, R, R) for t in tiles)


def test_every_image_lost_is_a_clear_error(tmp_path):
    folder = _folder(tmp_path, n=2)
    ds = ImageDataset(folder, resolution=R)
    for f in folder.glob("*.png"):
        f.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"every image .*unreadable.*img0\.png"):
            ds[0]


# --- item 9: float, 16-bit and 32-bit images -------------------------------------------------------


def test_float_tiff_in_0_1_is_scaled(tmp_path):
    values = np.array([[0.0, 0.2, 0.5], [1.0, 0.9999, 1e-9]], np.float32)
    Image.fromarray(values).save(tmp_path / "f.tif")
    got = read_image(tmp_path / "f.tif")
    want = np.rint(values.astype(np.float64) * 255).astype(np.uint8)
    np.testing.assert_array_equal(got, np.repeat(want[:, :, None], 3, axis=2))
    assert got.max() == 255  # not black


@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "inf")])
def test_non_finite_float_image_is_refused(tmp_path, bad, word):
    values = np.full((4, 4), 0.5, np.float32)
    values[1, 2] = bad
    path = tmp_path / "bad.tif"
    Image.fromarray(values).save(path)
    with pytest.raises(ValueError, match=word) as info:
        read_image(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("lo, hi", [(0.0, 255.0), (-1.0, 1.0), (0.0, 1.0001)])
def test_float_image_outside_0_1_is_refused(tmp_path, lo, hi):
    path = tmp_path / "range.tif"
    Image.fromarray(np.array([[lo, hi]], np.float32)).save(path)
    with pytest.raises(ValueError, match=r"0\.\.1") as info:
        read_image(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_16_bit_images_map_by_their_range(tmp_path, ext):
    values = np.array([[0, 257, 32896, 65535, 65280, 128]], np.uint16)
    Image.fromarray(values).save(tmp_path / f"g.{ext}")
    got = read_image(tmp_path / f"g.{ext}")[..., 0]
    np.testing.assert_array_equal(got, [[0, 1, 128, 255, 254, 0]])


@pytest.mark.parametrize("dtype", [np.int32, np.int16, np.uint32])
def test_32_bit_integer_tiff_is_refused(tmp_path, dtype):
    path = tmp_path / "wide.tif"
    Image.fromarray(np.array([[0, 100], [200, 255]], dtype)).save(path)  # TIFF stores these as 32-bit
    with pytest.raises(ValueError, match="32-bit") as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_float_images_in_a_dataset(tmp_path):
    Image.fromarray(np.full((R, R), 0.5, np.float32)).save(tmp_path / "ok.tif")
    Image.fromarray(np.full((R, R), np.nan, np.float32)).save(tmp_path / "nan.tif")
    ds = ImageDataset(tmp_path, resolution=R)
    assert ds.names == [str(tmp_path / "ok.tif")] and ds.skipped_unreadable == [str(tmp_path / "nan.tif")]
    assert torch.allclose(ds[0], torch.full((3, R, R), 128 / 127.5 - 1), atol=1e-6)  # 0.5 -> 128


# --- item 20: FIFOs and other non-regular files --------------------------------------------------


@needs_fifo
def test_fifo_in_a_folder_is_skipped_with_a_warning(tmp_path):
    folder = _folder(tmp_path)
    os.mkfifo(folder / "x.png")
    with pytest.warns(UserWarning, match=r"not a regular file.*x\.png"):
        files = list_images(folder)
    assert folder / "x.png" not in files and len(files) == 3
    with pytest.warns(UserWarning, match=r"x\.png"):
        ds = _within(10, lambda: ImageDataset(folder, resolution=R))
    assert len(ds.names) == 3


@needs_fifo
def test_fifo_given_by_name_is_an_error(tmp_path):
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file") as info:
        list_images(fifo)
    assert str(fifo) in str(info.value)
    with pytest.raises(ValueError, match="not a regular file"):
        _within(10, read_image, fifo)  # a file swapped for a FIFO after listing: no hang either


def test_folder_named_like_an_image_is_searched(tmp_path):
    (tmp_path / "album.png").mkdir()
    Image.fromarray(_photo(20, 20, 0)).save(tmp_path / "album.png" / "a.png")
    assert list_images(tmp_path) == [tmp_path / "album.png" / "a.png"]


def test_read_image_errors_name_the_file(tmp_path):
    path = tmp_path / "junk.png"
    path.write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.png"):
        read_image(path)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="folder"):
        read_image(tmp_path)


# --- property-based: arbitrary arrays written as images, arbitrary bytes --------------------------

# what PIL can write, per dtype: (shapes' channel counts, file formats)
_WRITABLE = {
    "uint8": ((None, 1, 2, 3, 4), ("png", "tif")),
    "bool": ((None,), ("png", "tif", "bmp")),
    "uint16": ((None,), ("png", "tif")),
    "int32": ((None,), ("tif",)),
    "int16": ((None,), ("tif",)),
    "float32": ((None, 1), ("tif",)),
    "float64": ((None,), ("tif",)),
}

_odd_floats = st.one_of(
    st.floats(0, 1, width=32),
    st.floats(width=32),
    st.sampled_from([0.0, 1.0, -0.0, 1e-45, 1.0000001, -1e-7, 255.0, np.nan, np.inf, -np.inf]),
)


@st.composite
def _images(draw):
    dtype = draw(st.sampled_from(sorted(_WRITABLE)))
    channels, formats = _WRITABLE[dtype]
    c = draw(st.sampled_from(channels))
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    shape = (h, w) if c is None else (h, w, c)
    elements = _odd_floats if dtype.startswith("float") else None
    array = draw(hnp.arrays(np.dtype(dtype), shape, elements=elements))
    return array, draw(st.sampled_from(formats))


def _expected(array: np.ndarray):
    """What read_image must return for ``array``, or None where it must refuse."""
    gray = array if array.ndim == 2 else array[:, :, 0]
    if array.dtype == np.uint8:
        rgb = array[:, :, :3] if array.ndim == 3 and array.shape[2] >= 3 else np.repeat(gray[:, :, None], 3, axis=2)
        return rgb
    if array.dtype == bool:
        return np.repeat(gray[:, :, None], 3, axis=2).astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return np.repeat(np.rint(gray / 257.0).astype(np.uint8)[:, :, None], 3, axis=2)
    if array.dtype.kind == "f":
        stored = gray.astype(np.float32).astype(np.float64)  # TIFF keeps float32
        if not np.isfinite(stored).all() or stored.min() < 0 or stored.max() > 1:
            return None
        return np.repeat(np.rint(stored * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    return None  # 32-bit integer TIFF: no standard white level


@given(image=_images())
def test_any_array_written_as_an_image_reads_back_or_is_refused(tmp_path_factory, image):
    array, fmt = image
    path = tmp_path_factory.mktemp("img") / f"pic.{fmt}"
    squeezed = array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array
    Image.fromarray(squeezed).save(path)
    want = _expected(array)
    if want is None:
        with pytest.raises(ValueError) as info:
            read_image(path)
        assert str(path) in str(info.value)
        return
    got = read_image(path)
    assert got.dtype == np.uint8 and got.shape == (*array.shape[:2], 3)
    np.testing.assert_array_equal(got, want)


def _png_bytes():
    import io

    buffer = io.BytesIO()
    Image.fromarray(_photo(5, 7, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


_PNG = _png_bytes()


@st.composite
def _damaged(draw):
    data = bytearray(_PNG)
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut])


@given(
    data=st.one_of(st.binary(max_size=200), _damaged(), st.just(b"")),
    ext=st.sampled_from([".png", ".jpg", ".tif", ".bmp", ".webp"]),
)
def test_any_bytes_named_as_an_image_give_pixels_or_a_named_error(tmp_path_factory, data, ext):
    path = tmp_path_factory.mktemp("bytes") / f"file{ext}"
    path.write_bytes(data)
    try:
        got = read_image(path)
    except ValueError as error:
        assert str(path) in str(error)
        return
    assert got.dtype == np.uint8 and got.ndim == 3 and got.shape[2] == 3 and min(got.shape[:2]) >= 1
