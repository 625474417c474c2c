import logging

import numpy as np
import pytest
import torch
from PIL import Image

from hetvae.config import DataConfig
from hetvae.data import ImageDataset, build_dataset
from hetvae.images import IMAGE_EXTENSIONS, list_images, read_image, sample_images

R = 16


def _photo(h, w, seed):
    # smooth gradients plus noise: every crop position gives a different tensor
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([yy * 255 // h, xx * 255 // w, (yy + xx) * 255 // (h + w)], axis=-1)
    return np.clip(base + rng.integers(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "c").mkdir()
    Image.fromarray(_photo(40, 48, 0)).save(tmp_path / "one.png")
    Image.fromarray(_photo(40, 40, 1)).save(tmp_path / "a" / "two.jpg", quality=95)
    Image.fromarray(_photo(32, 50, 2)).save(tmp_path / "a" / "b" / "three.JPG", quality=95)
    Image.fromarray(_photo(36, 36, 3)).save(tmp_path / "c" / "four.webp")
    Image.fromarray(_photo(33, 34, 4)).save(tmp_path / "c" / "five.bmp")
    Image.fromarray(_photo(30, 31, 5)).save(tmp_path / "c" / "six.tiff")
    Image.fromarray(_photo(24, 24, 6)[:, :, 0]).save(tmp_path / "a" / "gray.png")  # mode L
    rgba = np.concatenate([_photo(20, 20, 7), np.full((20, 20, 1), 128, np.uint8)], axis=-1)
    Image.fromarray(rgba).save(tmp_path / "a" / "b" / "rgba.png")  # mode RGBA
    Image.fromarray(_photo(8, 30, 8)).save(tmp_path / "c" / "small.png")  # 8 px < R
    good = (tmp_path / "one.png").read_bytes()
    (tmp_path / "c" / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "c" / "text.jpg").write_text("not an image")
    (tmp_path / "notes.txt").write_text("ignored")
    return tmp_path


def test_list_images_recursive_sorted_case_insensitive(folder):
    names = [p.relative_to(folder).as_posix() for p in list_images(folder)]
    assert names == sorted(names)
    assert "a/b/three.JPG" in names and "c/six.tiff" in names and "c/four.webp" in names
    assert not any(n.endswith(".txt") for n in names)
    assert len(names) == 11
    # a list of paths keeps its order and drops duplicates
    both = list_images([folder / "c", folder / "one.png", folder / "c"])
    assert both[-1] == folder / "one.png" and len(both) == 7


def test_list_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images(tmp_path / "nowhere")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "x.txt").write_text("")
    with pytest.raises(ValueError, match="empty") as info:
        list_images(tmp_path / "empty")
    assert ".png" in str(info.value) and ".webp" in str(info.value)
    (tmp_path / "empty" / "sub" / "x.csv").write_text("")
    with pytest.raises(ValueError, match="not an image"):
        list_images(tmp_path / "empty" / "sub" / "x.csv")
    # a .txt file is a list of image paths (tests/test_data_sources.py): an empty one lists none
    with pytest.raises(ValueError, match="lists no image path"):
        list_images(tmp_path / "empty" / "sub" / "x.txt")


def test_dataset_skips_and_converts(folder, caplog):
    with caplog.at_level(logging.WARNING, logger="hetvae.data"):
        with pytest.warns(UserWarning, match=r"skipped 1 image\(s\) smaller than 16x16: .*small\.png"):
            ds = ImageDataset(folder, resolution=R, seed=0)
    assert sorted(p.rsplit("/", 1)[-1] for p in ds.skipped_unreadable) == ["text.jpg", "truncated.png"]
    assert "truncated.png" in caplog.text and "text.jpg" in caplog.text
    assert len(ds) == 8
    for i in range(len(ds)):
        x = ds[i]
        assert x.shape == (3, R, R) and x.dtype == torch.float32
        assert x.min() >= -1.0 and x.max() <= 1.0
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_grayscale_and_rgba_become_rgb(folder):
    gray = read_image(folder / "a" / "gray.png")
    assert gray.shape == (24, 24, 3) and gray.dtype == np.uint8
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    rgba = read_image(folder / "a" / "b" / "rgba.png")
    assert rgba.shape == (20, 20, 3)
    np.testing.assert_array_equal(rgba, _photo(20, 20, 7))


def test_value_range_is_exact():
    black_white = np.zeros((R, R, 3), np.uint8)
    black_white[:, R // 2 :] = 255
    x = ImageDataset([("bw", black_white)], resolution=R, random_crop=False, random_flip=False)[0]
    assert x[:, :, : R // 2].eq(-1.0).all() and x[:, :, R // 2 :].eq(1.0).all()


def test_same_seed_same_crops_different_seed_different(folder):
    def crops(seed, epoch=0):
        ds = ImageDataset(folder, resolution=R, seed=seed)
        ds.set_epoch(epoch)
        return torch.stack([ds[i] for i in range(len(ds))])

    with pytest.warns(UserWarning):
        a, b, c, d = crops(0), crops(0), crops(1), crops(0, epoch=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, d)


def test_crops_do_not_depend_on_access_order_or_workers():
    images = [(f"im{i}", _photo(40, 60, i)) for i in range(6)]
    ds = ImageDataset(images, resolution=R, seed=3, num_samples=12)
    ds.set_epoch(2)
    forward = torch.stack([ds[i] for i in range(12)])
    backward = torch.stack([ds[i] for i in reversed(range(12))]).flip(0)
    assert torch.equal(forward, backward)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    assert torch.equal(torch.cat(list(loader)), forward)
    # an (epoch, index) key is that epoch's sample, whatever the current epoch
    ds.set_epoch(0)
    assert torch.equal(torch.stack([ds[(2, i)] for i in range(12)]), forward)
    assert not torch.equal(torch.stack([ds[i] for i in range(12)]), forward)


def test_center_crop_in_eval_mode():
    img = _photo(30, 40, 0)
    ds = ImageDataset([("x", img)], resolution=R, random_crop=False, random_flip=False, seed=5)
    top, left = (30 - R) // 2, (40 - R) // 2
    expected = torch.from_numpy(img[top : top + R, left : left + R].copy()).permute(2, 0, 1) / 127.5 - 1
    assert torch.allclose(ds[0], expected)


def test_random_flip_mirrors_the_crop():
    img = _photo(R, R, 0)  # crop == whole image, only the flip varies
    ds = ImageDataset([("x", img)], resolution=R, random_crop=True, random_flip=True, num_samples=32)
    plain = ImageDataset([("x", img)], resolution=R, random_crop=False, random_flip=False)[0]
    outs = [ds[i] for i in range(32)]
    assert all(torch.equal(o, plain) or torch.equal(o, plain.flip(-1)) for o in outs)
    assert any(torch.equal(o, plain.flip(-1)) for o in outs) and any(torch.equal(o, plain) for o in outs)


def test_tiles_cover_the_image_without_overlap():
    img = _photo(2 * R + 3, 3 * R + 1, 0)
    ds = ImageDataset([("x", img)], resolution=R, random_crop=False, random_flip=False, tiles=True)
    assert len(ds) == 6
    top, left = 1, 0  # the grid is centred
    expected = torch.from_numpy(img[top : top + R, left + R : left + 2 * R].copy()).permute(2, 0, 1) / 127.5 - 1
    assert torch.allclose(ds[1], expected)
    with pytest.raises(ValueError, match="random_crop=False"):
        ImageDataset([("x", img)], resolution=R, tiles=True)


def test_all_unusable_is_an_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.fromarray(_photo(8, 8, 0)).save(tmp_path / "tiny.png")
    with pytest.warns(UserWarning, match="smaller"):
        with pytest.raises(ValueError, match=r"no usable image among 2: 1 unreadable, 1 smaller than 16x16"):
            ImageDataset(tmp_path, resolution=R)


def test_sample_images_split():
    train, test, everything = sample_images("train"), sample_images("test"), sample_images("all")
    train_names, test_names = {n for n, _ in train}, {n for n, _ in test}
    assert len(train) >= 2 * len(test) - 1 and len(test) >= 3
    assert train_names.isdisjoint(test_names)
    # region entries appear as "<name>[left]" (train) and "<name>[right]" (test)
    base = lambda names: {n.split("[")[0] for n in names}  # noqa: E731
    assert base(train_names) | base(test_names) == {n for n, _ in everything}
    for _, img in everything:
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert min(img.shape[:2]) >= 64
    with pytest.raises(ValueError, match="split"):
        sample_images("validation")


def test_build_dataset_embedded_default():
    ds = build_dataset(DataConfig(resolution=64), train=True, seed=0)
    assert len(ds) == len(sample_images("train"))
    assert ds[0].shape == (3, 64, 64)
    held_out = build_dataset(DataConfig(resolution=64, eval_crop="tiles"), train=False)
    assert set(held_out.names) == {n for n, _ in sample_images("test")}
    assert len(held_out) > len(held_out.names)


def test_build_dataset_from_path(folder):
    # centre-crop evaluation reads headers only: the small image and the one without an image header
    # are left out here; the truncated PNG's header reads, so it is found (and substituted) when read
    with pytest.warns(UserWarning, match=r"skipped 1 image\(s\) smaller than 16x16"):
        ds = build_dataset(DataConfig(path=str(folder), resolution=R), train=False)
    assert len(ds) == 9 and not ds.random_crop and ds.check == "header"
    assert [n.rsplit("/", 1)[-1] for n in ds.skipped_unreadable] == ["text.jpg"]
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*truncated\.png"):
        crops = [ds[i] for i in range(len(ds))]
    assert all(c.shape == (3, R, R) for c in crops)
    assert sorted(n.rsplit("/", 1)[-1] for n in ds.skipped_unreadable) == ["text.jpg", "truncated.png"]
    # tiles need every image's size: a full check, which decodes, as ImageDataset's default does
    with pytest.warns(UserWarning, match="smaller"):
        tiles = build_dataset(DataConfig(path=str(folder), resolution=R, eval_crop="tiles"), train=False)
    assert len(tiles.names) == 8 and tiles.check == "full"
    # training reads nothing up front: every listed file counts until a read finds it unusable
    train = build_dataset(DataConfig(path=str(folder), resolution=R), train=True)
    assert len(train) == 11 and train.check == "lazy" and train.skipped_small == train.skipped_unreadable == []


def test_extension_set():
    assert {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"} == set(IMAGE_EXTENSIONS)


# --- held-out split and augmentations ------------------------------------------------------------


def test_held_out_split_is_colour_photographs_never_seen_in_training():
    from hetvae.images import HOLDOUT_FRACTION, _load_sample

    train, test = dict(sample_images("train")), dict(sample_images("test"))
    for name, img in test.items():
        chroma = img.astype(int).max(axis=2) - img.astype(int).min(axis=2)
        assert chroma.mean() > 10, f"{name} is not a colour photograph"
        base = name.removesuffix("[right]")
        assert base not in train and base + "[left]" not in train or name.endswith("[right]")
        if name.endswith("[right]"):
            whole, left = _load_sample(base), train[base + "[left]"]
            cut = int(round(whole.shape[1] * HOLDOUT_FRACTION))
            # the two parts tile the photograph without overlap
            assert left.shape[1] == cut and img.shape[1] == whole.shape[1] - cut
            np.testing.assert_array_equal(np.concatenate([left, img], axis=1), whole)
    assert "motorcycle" in test and not any(n.startswith("motorcycle") for n in train)


def test_rescale_shows_a_larger_window_shrunk_to_the_crop():
    img = _photo(64, 64, 0)
    ds = ImageDataset([("p", img)], resolution=R, rescale=(0.25, 0.25), random_flip=False, num_samples=4)
    x = ds[0]
    assert x.shape == (3, R, R)
    # a 64 px window shrunk 4x: the whole gradient, so the crop spans most of the value range
    span = (x[0].max() - x[0].min()).item()
    plain = ImageDataset([("p", img)], resolution=R, random_flip=False, num_samples=4)[0]
    assert span > 2.5 * (plain[0].max() - plain[0].min()).item()
    # scale is capped so the window fits the image
    small = ImageDataset([("p", _photo(20, 40, 1))], resolution=R, rescale=(0.1, 0.1), num_samples=2)
    assert small[0].shape == (3, R, R)
    with pytest.raises(ValueError, match="rescale"):
        ImageDataset([("p", img)], resolution=R, rescale=(0.5, 1.5))
    with pytest.raises(ValueError, match="random_crop=True"):
        ImageDataset([("p", img)], resolution=R, random_crop=False, color_jitter=0.1)


def test_color_jitter_is_mild_keeps_grey_grey_and_8_bit():
    from hetvae.data import jitter_colors

    rng = np.random.default_rng(0)
    photo = _photo(32, 32, 3)
    assert np.array_equal(jitter_colors(photo, rng, 0.0), photo)
    grey = np.repeat(photo[:, :, :1], 3, axis=2)
    out = jitter_colors(grey, rng, 0.2)
    assert out.dtype == np.uint8
    assert np.abs(out.astype(int)[:, :, 0] - out[:, :, 1]).max() <= 1  # hue rotation about the grey axis
    shifted = jitter_colors(photo, np.random.default_rng(1), 0.1)
    assert 0 < np.abs(shifted.astype(int) - photo).mean() < 30


def test_tint_gray_colours_a_grey_crop_and_keeps_its_luminance_structure():
    from hetvae.data import tint_gray

    grey = np.repeat(_photo(32, 32, 5)[:, :, :1], 3, axis=2)
    tinted = [tint_gray(grey, np.random.default_rng(k)).astype(float) for k in range(20)]
    assert all(t.shape == grey.shape for t in tinted)
    chroma = [np.abs(t - t.mean(axis=2, keepdims=True)).mean() for t in tinted]
    assert min(chroma) > 0 and np.mean(chroma) > 5  # no longer grey, in 8-bit units
    # the luminance pattern is kept: each tinted channel follows the grey image's structure
    for t in tinted:
        luma = t @ np.array([0.299, 0.587, 0.114])
        assert np.corrcoef(luma.ravel(), grey[:, :, 0].ravel().astype(float))[0, 1] > 0.9
    assert np.array_equal(tint_gray(grey, np.random.default_rng(3)), tint_gray(grey, np.random.default_rng(3)))


def test_tint_gray_touches_grey_crops_only():
    photo, grey = _photo(48, 48, 0), np.repeat(_photo(48, 48, 1)[:, :, :1], 3, axis=2)
    kw = dict(resolution=R, num_samples=32, seed=2)
    plain = ImageDataset([("c", photo), ("g", grey)], **kw)
    tinted = ImageDataset([("c", photo), ("g", grey)], tint_gray=1.0, **kw)
    half = ImageDataset([("c", photo), ("g", grey)], tint_gray=0.5, **kw)
    n_tinted = 0
    for i in range(32):
        if i % 2 == 0:  # the colour photograph's crops are untouched, draw for draw
            assert torch.equal(plain[i], tinted[i])
        else:
            assert torch.equal(plain[i][0], plain[i][1])  # grey without the tint
            assert not torch.equal(tinted[i][0], tinted[i][1])
            n_tinted += not torch.equal(half[i][0], half[i][1])
    assert 0 < n_tinted < 16  # tint_gray=0.5 tints some grey crops, not all
    with pytest.raises(ValueError, match="tint_gray"):
        ImageDataset([("g", grey)], resolution=R, tint_gray=1.5)
    with pytest.raises(ValueError, match="random_crop=True"):
        ImageDataset([("g", grey)], resolution=R, random_crop=False, tint_gray=0.5)


def test_augmented_and_procedural_samples_are_deterministic():
    img = _photo(48, 48, 0)
    kw = dict(resolution=R, rescale=(0.5, 1.0), color_jitter=0.1, procedural=0.5, num_samples=16, seed=3)
    a, b = ImageDataset([("p", img)], **kw), ImageDataset([("p", img)], **kw)
    order = list(range(16))
    first = [a[i] for i in order]
    second = [b[i] for i in reversed(order)][::-1]
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    assert 0 < len(a._pool) <= a.procedural_pool  # some samples came from the dead-leaves pool
    only = ImageDataset([("p", img)], resolution=R, procedural=1.0, num_samples=4)
    assert all(x.shape == (3, R, R) and x.min() >= -1 and x.max() <= 1 for x in (only[i] for i in range(4)))
    with pytest.raises(ValueError, match="procedural"):
        ImageDataset([("p", img)], resolution=R, procedural=1.5)


def test_build_dataset_passes_the_augmentations():
    data = DataConfig(
        resolution=32, samples_per_epoch=8, rescale=[0.5, 1.0], color_jitter=0.1, tint_gray=0.8, procedural=0.25
    )
    ds = build_dataset(data, train=True, seed=0)
    assert ds.rescale == (0.5, 1.0) and ds.color_jitter == 0.1 and ds.procedural == 0.25 and ds.tint_gray == 0.8
    held_out = build_dataset(data, train=False)  # evaluation is never augmented
    assert held_out.rescale is None and held_out.procedural == 0 and held_out.tint_gray == 0


def _count_decodes(monkeypatch):
    import hetvae.data as data_module

    calls = []

    def counting(path):
        calls.append(str(path))
        return read_image(path)

    monkeypatch.setattr(data_module, "read_image", counting)
    return calls


def test_cache_decodes_each_file_once_and_gives_the_same_crops(tmp_path, monkeypatch):
    for k in range(3):
        Image.fromarray(_photo(40, 48, k)).save(tmp_path / f"p{k}.png")
    plain = ImageDataset(tmp_path, resolution=R, seed=4, num_samples=30)
    expected = []
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        expected.append([plain[i] for i in range(len(plain))])
    calls = _count_decodes(monkeypatch)
    cached = ImageDataset(tmp_path, resolution=R, seed=4, num_samples=30, cache_mb=1.0)
    assert len(calls) == 3  # the check at construction decodes each file once, and keeps it
    for epoch in (0, 1):
        cached.set_epoch(epoch)
        for i in range(len(cached)):
            assert torch.equal(cached[i], expected[epoch][i])
    assert len(calls) == 3
    calls.clear()
    off = ImageDataset(tmp_path, resolution=R, seed=4, num_samples=30, cache_mb=0)
    _ = [off[i] for i in range(len(off))]
    assert len(calls) == 3 + 30  # without a cache every crop decodes its file


def test_cache_keeps_the_most_recently_used_within_its_budget(tmp_path, monkeypatch):
    for k in range(3):
        Image.fromarray(_photo(40, 48, k)).save(tmp_path / f"p{k}.png")
    one_image = 40 * 48 * 3
    calls = _count_decodes(monkeypatch)
    ds = ImageDataset(tmp_path, resolution=R, random_crop=False, random_flip=False, cache_mb=2.5 * one_image / 2**20)
    assert ds._cache_bytes == 2 * one_image and list(ds._cache) == [1, 2]  # p0 dropped for p2
    calls.clear()
    ds[0]  # decoded again, and p1 (least recently used) makes room for it
    assert calls == [str(tmp_path / "p0.png")] and list(ds._cache) == [2, 0]
    ds[2], ds[0]
    assert len(calls) == 1
    too_small = ImageDataset(tmp_path, resolution=R, cache_mb=0.5 * one_image / 2**20)
    assert too_small._cache_bytes == 0 and too_small[0].shape == (3, R, R)


def test_cache_size_is_checked():
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="cache_mb"):
            ImageDataset([np.zeros((R, R, 3), np.uint8)], resolution=R, cache_mb=bad)
    from hetvae.schema import ConfigError

    with pytest.raises(ConfigError, match="cache_mb: must be >= 0"):
        DataConfig(cache_mb=-1)


def test_build_dataset_passes_the_cache_size(tmp_path):
    Image.fromarray(_photo(40, 48, 0)).save(tmp_path / "p.png")
    for train in (True, False):
        assert build_dataset(DataConfig(path=str(tmp_path), resolution=R, cache_mb=3), train=train)._cache_limit == 3 * 2**20
    assert build_dataset(DataConfig(path=str(tmp_path), resolution=R, cache_mb=0), train=True)._cache_bytes == 0
