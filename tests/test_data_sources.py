"""Data at scale: lazy checking (a folder of any size is ready at once), list files, Hugging Face
datasets (save_to_disk folders and parquet files) and the detection of what a data path names."""

import io
import sys
import warnings

import numpy as np
import pytest
import test_data
import torch
from PIL import Image

import hetvae.data as data_module
from hetvae.config import DataConfig
from hetvae.data import ImageDataset, build_dataset, source_kind
from hetvae.images import image_size, list_images, read_image, read_list_file

R = 16
_photo = test_data._photo  # the same gradient-plus-noise test photographs


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _folder(path, n=4, size=(40, 48)):
    path.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        Image.fromarray(_photo(size[0], size[1] + k, k)).save(path / f"p{k}.png")
    return path


def _count(monkeypatch, name):
    """Calls of hetvae.data's ``name`` (read_image, image_size, decode_image), recorded by argument."""
    calls, original = [], getattr(data_module, name)

    def counting(*args, **kwargs):
        calls.append(args[0] if isinstance(args[0], (bytes, bytearray)) else str(args[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(data_module, name, counting)
    return calls


def _crops(ds, epoch=0):
    ds.set_epoch(epoch)
    return torch.stack([ds[i] for i in range(len(ds))])


# --- lazy checking ---------------------------------------------------------------------------------


def test_lazy_reads_nothing_up_front(tmp_path, monkeypatch):
    folder = _folder(tmp_path / "f")
    reads, headers = _count(monkeypatch, "read_image"), _count(monkeypatch, "image_size")
    ds = ImageDataset(folder, resolution=R, check="lazy", num_samples=8)
    assert reads == [] and headers == [] and ds.names == [str(p) for p in sorted(folder.glob("*.png"))]
    ds[5]
    assert reads == [str(folder / "p1.png")] and headers == []


def test_lazy_and_full_give_the_same_crops_on_a_clean_folder(tmp_path):
    folder = _folder(tmp_path / "f")
    kw = dict(resolution=R, seed=7, num_samples=12, rescale=(0.5, 1.0), color_jitter=0.1)
    full, lazy = ImageDataset(folder, **kw), ImageDataset(folder, check="lazy", **kw)
    header = ImageDataset(folder, check="header", **kw)
    for epoch in (0, 3):
        expected = _crops(full, epoch)
        assert torch.equal(_crops(lazy, epoch), expected) and torch.equal(_crops(header, epoch), expected)


@pytest.fixture
def damaged(tmp_path):
    """p0 good, p1 truncated, p2 too small, p3 good, p4 not an image, p5 good."""
    folder = tmp_path / "damaged"
    folder.mkdir()
    Image.fromarray(_photo(40, 48, 0)).save(folder / "p0.png")
    (folder / "p1.png").write_bytes(_png(_photo(40, 40, 1))[:200])
    Image.fromarray(_photo(R - 4, 48, 2)).save(folder / "p2.png")
    Image.fromarray(_photo(36, 44, 3)).save(folder / "p3.png")
    (folder / "p4.jpg").write_text("not an image")
    Image.fromarray(_photo(44, 36, 5)).save(folder / "p5.png")
    return folder


def test_lazy_finds_unusable_images_when_first_read(damaged, monkeypatch, caplog):
    ds = ImageDataset(damaged, resolution=R, seed=2, check="lazy", num_samples=12)
    assert len(ds.names) == 6 and ds.skipped_small == ds.skipped_unreadable == []
    reads = _count(monkeypatch, "read_image")
    with pytest.warns(UserWarning) as record, caplog.at_level("INFO", logger="hetvae.data"):
        first = _crops(ds, 1)
    assert all(bad in caplog.text for bad in ("p1.png", "p2.png", "p4.jpg"))  # logged as well
    messages = [str(w.message) for w in record]
    for bad in ("p1.png", "p2.png", "p4.jpg"):
        assert sum(bad in m for m in messages) == 1, messages  # one warning per file
    assert any("p2.png" in m and "smaller than the 16x16 crop" in m for m in messages)
    assert ds.skipped_small == [str(damaged / "p2.png")]
    assert ds.skipped_unreadable == [str(damaged / "p1.png"), str(damaged / "p4.jpg")]
    assert ds.lost_during_run == []
    # a sample of an unusable image is the next usable image's crop, with that sample's own draws
    for i in range(12):
        used = {0: 0, 1: 3, 2: 3, 3: 3, 4: 5, 5: 5}[i % 6]
        pixels = read_image(damaged / ("p%d.png" % used))
        assert torch.equal(first[i], ds.augment(pixels, np.random.default_rng((2, 1, i))))
    # found unusable once: neither warned about nor read again in this process
    reads.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = _crops(ds, 1)
    assert torch.equal(again, first)
    assert not any(name.endswith(("p1.png", "p2.png", "p4.jpg")) for name in reads)


def test_lazy_substitutes_are_deterministic_across_datasets_and_workers(damaged):
    kw = dict(resolution=R, seed=5, check="lazy", num_samples=12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = ImageDataset(damaged, **kw)
        expected = torch.stack([a[(2, i)] for i in range(12)])
        b = ImageDataset(damaged, **kw)
        assert torch.equal(torch.stack([b[(2, i)] for i in reversed(range(12))]).flip(0), expected)
        loader = torch.utils.data.DataLoader(ImageDataset(damaged, **kw), batch_size=4, num_workers=2,
                                             sampler=[(2, i) for i in range(12)])
        assert torch.equal(torch.cat(list(loader)), expected)


def test_lazy_all_unusable_is_an_error_at_the_first_read(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.fromarray(_photo(8, 8, 0)).save(tmp_path / "tiny.png")
    ds = ImageDataset(tmp_path, resolution=R, check="lazy")  # nothing read yet
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"every image became unusable.*bad\.png, .*tiny\.png.*1 unreadable and 1 too small"):
            ds[0]
        with pytest.raises(ValueError, match="every image became unusable"):
            ds[1]


def test_first_usable_is_a_cheap_start_up_check(damaged, tmp_path, monkeypatch):
    reads = _count(monkeypatch, "read_image")
    ds = ImageDataset(damaged, resolution=R, check="lazy")
    assert ds.first_usable() == 0 and len(reads) == 1
    (damaged / "bad-first.txt").write_text("p1.png\np2.png\np4.jpg\np3.png\np0.png\n")
    with pytest.warns(UserWarning) as record:
        assert ImageDataset(damaged / "bad-first.txt", resolution=R, check="lazy").first_usable() == 3
    named = [[n for n in ("p0.png", "p1.png", "p2.png", "p3.png", "p4.jpg") if n in str(w.message)] for w in record]
    assert named == [["p1.png"], ["p2.png"], ["p4.jpg"]]  # read in order up to the first usable one, p3
    Image.fromarray(_photo(8, 8, 0)).save(tmp_path / "tiny.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"every image became unusable.*tiny\.png"):
            ImageDataset(tmp_path / "tiny.png", resolution=R, check="lazy").first_usable()


def test_lazy_dataset_keeps_the_lost_during_run_rule(tmp_path):
    folder = _folder(tmp_path / "f", n=3)
    ds = ImageDataset(folder, resolution=R, random_crop=False, random_flip=False, check="lazy")
    before = [ds[i] for i in range(3)]
    (folder / "p1.png").unlink()
    with pytest.warns(UserWarning, match=r"p1\.png became unusable during the run"):
        assert torch.equal(ds[1], before[2])
    assert ds.lost_during_run == [str(folder / "p1.png")] and ds.skipped_unreadable == []


def test_lazy_with_cache_decodes_each_file_once(tmp_path, monkeypatch):
    folder = _folder(tmp_path / "f", n=3)
    reads = _count(monkeypatch, "read_image")
    ds = ImageDataset(folder, resolution=R, check="lazy", num_samples=30, cache_mb=1.0)
    _crops(ds, 0), _crops(ds, 1)
    assert sorted(reads) == sorted(str(p) for p in folder.glob("*.png"))


def test_header_check_reads_sizes_not_pixels(damaged, monkeypatch):
    reads, headers = _count(monkeypatch, "read_image"), _count(monkeypatch, "image_size")
    with pytest.warns(UserWarning, match=r"skipped 1 image\(s\) smaller than 16x16: .*p2\.png"):
        ds = ImageDataset(damaged, resolution=R, random_crop=False, random_flip=False, check="header")
    assert reads == [] and len(headers) == 6
    assert ds.skipped_unreadable == [str(damaged / "p4.jpg")]  # no image header at all
    assert len(ds.names) == 4  # p0, p1 (its header reads), p3, p5
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*p1\.png"):
        assert torch.equal(ds[1], ds[2])  # p1's pixel data is truncated: p3 stands in
    assert ds.skipped_unreadable == [str(damaged / "p4.jpg"), str(damaged / "p1.png")]


def test_check_modes_are_checked(tmp_path):
    folder = _folder(tmp_path / "f", n=1)
    with pytest.raises(ValueError, match="check must be"):
        ImageDataset(folder, resolution=R, check="quick")
    with pytest.raises(ValueError, match="tiles=True needs check='full'"):
        ImageDataset(folder, resolution=R, random_crop=False, random_flip=False, tiles=True, check="lazy")


def test_in_memory_images_are_checked_up_front_in_every_mode():
    images = [("big", _photo(40, 40, 0)), ("small", _photo(8, 40, 1))]
    with pytest.warns(UserWarning, match=r"skipped 1 image\(s\) smaller than 16x16: small"):
        ds = ImageDataset(images, resolution=R, check="lazy")
    assert ds.names == ["big"] and ds.in_memory


def test_image_size_reads_the_header(tmp_path):
    Image.fromarray(_photo(30, 50, 0)).save(tmp_path / "a.jpg")
    assert image_size(tmp_path / "a.jpg") == (30, 50)
    assert image_size(_png(_photo(12, 7, 0)), "cell") == (12, 7)
    with pytest.raises(ValueError, match="cell"):
        image_size(b"junk", "cell")


def test_build_dataset_checks_lazily_for_training(tmp_path, monkeypatch):
    folder = _folder(tmp_path / "f")
    reads, headers = _count(monkeypatch, "read_image"), _count(monkeypatch, "image_size")
    ds = build_dataset(DataConfig(path=str(folder), resolution=R), train=True)
    assert ds.check == "lazy" and reads == [] and headers == []
    assert build_dataset(DataConfig(path=str(folder), resolution=R), train=False).check == "header"
    assert build_dataset(DataConfig(path=str(folder), resolution=R), train=False, check="full").check == "full"


# --- list files ------------------------------------------------------------------------------------


def test_list_file_names_images_relative_to_its_folder(tmp_path):
    folder = _folder(tmp_path / "imgs", n=3)
    other = _folder(tmp_path / "elsewhere", n=1)
    (tmp_path / "lists").mkdir()
    listing = tmp_path / "lists" / "train.txt"
    listing.write_text(
        "# training images\n\n"
        "../imgs/p2.png\n"
        f"  {other / 'p0.png'}  \n"  # absolute, surrounding spaces ignored
        "../imgs/p0.png\n"
        "../imgs/p2.png\n"  # a duplicate: kept once
        "   # an indented comment\n"
    )
    expected = [tmp_path / "lists/../imgs/p2.png", other / "p0.png", tmp_path / "lists/../imgs/p0.png"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_list_file(listing) == expected
        assert list_images(listing) == expected
        assert list_images([listing, folder / "p1.png"]) == expected + [folder / "p1.png"]
    assert source_kind(listing) == "list"
    ds = build_dataset(DataConfig(path=str(listing), resolution=R), train=True)
    assert ds.names == [str(p) for p in expected]
    assert ds[0].shape == (3, R, R)


def test_list_file_with_missing_and_non_image_paths_warns_once(tmp_path):
    folder = _folder(tmp_path, n=2)
    (tmp_path / "sub").mkdir()
    listing = tmp_path / "list.txt"
    listing.write_text("p0.png\nmissing.png\nnotes.csv\nsub\np1.png\ngone.jpg\n")
    with pytest.warns(UserWarning, match=r"list\.txt.*left out 4 of 6 listed path\(s\).*missing\.png \(missing\)") as record:
        files = list_images(listing)
    assert len(record) == 1
    text = str(record[0].message)
    assert "notes.csv (not an image file)" in text and "gone.jpg (missing)" in text
    assert files == [folder / "p0.png", folder / "p1.png"]


def test_list_file_without_a_usable_image_is_an_error(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("missing.png\nnotes.csv\n")
    with pytest.raises(ValueError, match=r"list file .*list\.txt.*none of its 2 listed path\(s\).*missing\.png"):
        list_images(listing)
    listing.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match=r"list\.txt.*lists no image path"):
        list_images(listing)
    with pytest.raises(ValueError, match=r"list\.txt"):
        build_dataset(DataConfig(path=str(listing), resolution=R), train=True)


# --- what a data path names --------------------------------------------------------------------


def test_source_kind(tmp_path):
    folder = _folder(tmp_path / "f", n=1)
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "dataset_info.json").write_text("{}")
    (tmp_path / "saved" / "state.json").write_text("{}")
    (tmp_path / "dict").mkdir()
    (tmp_path / "dict" / "dataset_dict.json").write_text("{}")
    assert source_kind(folder) == "folder" and source_kind(str(folder / "p0.png")) == "image"
    assert source_kind(tmp_path / "saved") == "hf" and source_kind(tmp_path / "dict") == "hf"
    assert source_kind(tmp_path / "list.TXT") == "list"
    assert source_kind("data/train-00000-of-00004.parquet") == "parquet"
    assert source_kind("data/*.parquet") == "parquet"
    for shards in ("shards/train-000000.tar", "shards/train-{000000..000099}.tar", "s/*.TAR"):
        assert source_kind(shards) == "shards"


def test_shards_point_at_the_trainers_shard_source(tmp_path):
    for path in ("shards/train-{000000..000099}.tar", str(tmp_path / "one.tar")):
        with pytest.raises(ValueError, match=r"tar shards.*hetvae\.shards"):
            build_dataset(DataConfig(path=path, resolution=R), train=True)
    with pytest.raises(ValueError, match=r"tar shards.*hetvae\.shards"):
        ImageDataset([str(_folder(tmp_path / "f", n=1)), "x.tar"], resolution=R)


# --- Hugging Face datasets ---------------------------------------------------------------------


@pytest.fixture
def hf(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # parquet is converted there
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    datasets.disable_progress_bars()
    return datasets


def _photos(n=5):
    return [_photo(40, 44 + k, 10 + k) for k in range(n)]


def _image_dataset(datasets, arrays, column="image", **extra):
    table = {column: [Image.fromarray(a) for a in arrays], **extra}
    return datasets.Dataset.from_dict(table).cast_column(column, datasets.Image())


def test_saved_dataset_gives_the_crops_of_the_same_files(hf, tmp_path):
    arrays = _photos()
    saved = tmp_path / "saved"
    _image_dataset(hf, arrays, label=list(range(len(arrays)))).save_to_disk(str(saved))
    folder = tmp_path / "files"
    folder.mkdir()
    for k, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"p{k}.png")  # the same pixels as files
    assert source_kind(saved) == "hf"
    kw = dict(resolution=R, seed=3, num_samples=10, rescale=(0.5, 1.0), color_jitter=0.1, tint_gray=0.5)
    for check in ("lazy", "header", "full"):
        from_rows = ImageDataset(saved, check=check, **kw)
        assert from_rows.names == [f"{saved}[{k}]" for k in range(5)]
        for epoch in (0, 1):
            assert torch.equal(_crops(from_rows, epoch), _crops(ImageDataset(folder, check=check, **kw), epoch))
    ds = build_dataset(DataConfig(path=str(saved), resolution=R), train=True)
    assert ds.check == "lazy" and len(ds) == 5 and not ds.in_memory
    # pickled into DataLoader workers, the same crops
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    assert torch.equal(torch.cat(list(loader)), _crops(ds, 0))


def test_dataset_rows_use_the_decode_cache(hf, tmp_path, monkeypatch):
    saved = tmp_path / "saved"
    _image_dataset(hf, _photos(3)).save_to_disk(str(saved))
    decodes = _count(monkeypatch, "decode_image")
    ds = ImageDataset(saved, resolution=R, check="lazy", num_samples=12, cache_mb=1.0)
    _crops(ds, 0), _crops(ds, 1)
    assert len(decodes) == 3
    off = ImageDataset(saved, resolution=R, check="lazy", num_samples=12, cache_mb=0)
    _crops(off, 0)
    assert len(decodes) == 3 + 12


def test_parquet_files_and_globs(hf, tmp_path):
    arrays = _photos(4)
    (tmp_path / "pq").mkdir()
    _image_dataset(hf, arrays[:2]).to_parquet(str(tmp_path / "pq" / "train-0.parquet"))
    _image_dataset(hf, arrays[2:]).to_parquet(str(tmp_path / "pq" / "train-1.parquet"))
    in_memory = ImageDataset([(f"a{k}", a) for k, a in enumerate(arrays)], resolution=R, seed=1, num_samples=8)
    pattern = str(tmp_path / "pq" / "*.parquet")
    assert source_kind(pattern) == "parquet"
    ds = build_dataset(DataConfig(path=pattern, resolution=R, samples_per_epoch=8), train=True, seed=1)
    assert ds.names == [f"{pattern}[{k}]" for k in range(4)]
    assert torch.equal(_crops(ds), _crops(in_memory))
    one = ImageDataset(str(tmp_path / "pq" / "train-1.parquet"), resolution=R, check="lazy")
    assert len(one) == 2
    (tmp_path / "pq").rename(tmp_path / "spark.parquet")  # a folder named like a file: the files in it
    assert len(ImageDataset(str(tmp_path / "spark.parquet"), resolution=R, check="lazy")) == 4
    with pytest.raises(FileNotFoundError, match="no parquet file matches"):
        ImageDataset(str(tmp_path / "none" / "*.parquet"), resolution=R)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageDataset(str(tmp_path / "missing.parquet"), resolution=R)


def test_raw_bytes_and_image_storage_columns(hf, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = _photos(3)
    hf.Dataset.from_dict({"png": [_png(a) for a in arrays]}).save_to_disk(str(tmp_path / "raw"))
    ds = build_dataset(DataConfig(path=str(tmp_path / "raw"), resolution=R, image_column="png"), train=False)
    files = tmp_path / "files"
    files.mkdir()
    paths = []
    for k, a in enumerate(arrays):
        paths.append(files / f"p{k}.png")
        Image.fromarray(a).save(paths[-1])
    expected = _crops(ImageDataset(files, resolution=R, random_crop=False, random_flip=False))
    assert torch.equal(_crops(ds), expected)
    # parquet written by another tool: Image's storage (bytes, or an image file's path) without the feature
    cells = [{"bytes": _png(arrays[0]), "path": None}, {"bytes": None, "path": str(paths[1])},
             {"bytes": _png(arrays[2]), "path": "ignored.png"}]
    pq.write_table(pa.table({"img": cells}), tmp_path / "other.parquet")
    ds = ImageDataset(str(tmp_path / "other.parquet"), resolution=R, random_crop=False, random_flip=False,
                      image_column="img")
    assert torch.equal(_crops(ds), expected)


def test_dataset_dict_reads_train_and_says_so(hf, tmp_path):
    split = _image_dataset(hf, _photos(2))
    hf.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "dd"))
    with pytest.warns(UserWarning, match=r"splits train, test: reading 'train'.*dd/train"):
        ds = ImageDataset(tmp_path / "dd", resolution=R, check="lazy")
    assert ds.names[0] == f"{tmp_path / 'dd' / 'train'}[0]"
    assert len(ImageDataset(tmp_path / "dd" / "test", resolution=R, check="lazy")) == 2
    hf.DatasetDict({"train": split}).save_to_disk(str(tmp_path / "one"))
    with pytest.warns(UserWarning, match=r"one' is a Hugging Face DatasetDict with the split train: reading 'train'$"):
        ImageDataset(tmp_path / "one", resolution=R, check="lazy")
    hf.DatasetDict({"validation": split, "test": split}).save_to_disk(str(tmp_path / "nt"))
    with pytest.raises(ValueError, match=r"splits validation, test and no 'train': name one split's subfolder.*nt/validation"):
        ImageDataset(tmp_path / "nt", resolution=R)


def test_dataset_errors_name_the_column_and_the_dataset(hf, tmp_path):
    saved = tmp_path / "saved"
    _image_dataset(hf, _photos(2), label=[0, 1]).save_to_disk(str(saved))
    with pytest.raises(ValueError, match=r"saved' has no column 'img' \(data.image_column\); its columns: image, label"):
        build_dataset(DataConfig(path=str(saved), resolution=R, image_column="img"), train=True)
    _image_dataset(hf, _photos(1)).to_parquet(str(tmp_path / "x.parquet"))
    with pytest.raises(ValueError, match=r"x\.parquet' has no column 'img'.*its columns: image"):
        ImageDataset(str(tmp_path / "x.parquet"), resolution=R, image_column="img")
    with pytest.raises(ValueError, match=r"column 'label' .* holds .*int64.*not images"):
        ImageDataset(saved, resolution=R, image_column="label")
    _image_dataset(hf, _photos(1)).select([]).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"empty' is empty \(0 rows\)"):
        ImageDataset(tmp_path / "empty", resolution=R)
    _image_dataset(hf, _photos(1)).select([]).to_parquet(str(tmp_path / "empty.parquet"))
    with pytest.raises(ValueError, match=r"empty\.parquet' is empty \(0 rows\)"):
        ImageDataset(str(tmp_path / "empty.parquet"), resolution=R)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"cannot read the parquet file .*junk\.parquet"):
        ImageDataset(str(tmp_path / "junk.parquet"), resolution=R)


def test_unusable_rows_are_found_when_read(hf, tmp_path):
    arrays = _photos(3)
    cells = [_png(arrays[0]), b"garbage", _png(_photo(8, 40, 0)), _png(arrays[2])]
    saved = tmp_path / "saved"
    hf.Dataset.from_dict({"image": cells}).save_to_disk(str(saved))
    ds = ImageDataset(saved, resolution=R, random_crop=False, random_flip=False, check="lazy")
    with pytest.warns(UserWarning) as record:
        crops = _crops(ds)
    assert any(f"{saved}[1]" in str(w.message) for w in record) and any(f"{saved}[2]" in str(w.message) for w in record)
    assert ds.skipped_unreadable == [f"{saved}[1]"] and ds.skipped_small == [f"{saved}[2]"]
    assert torch.equal(crops[1], crops[3]) and torch.equal(crops[2], crops[3])
    # a full check finds both up front and leaves them out
    with pytest.warns(UserWarning, match=r"skipped 1 image\(s\) smaller than 16x16: .*saved\[2\]"):
        full = ImageDataset(saved, resolution=R, random_crop=False, random_flip=False)
    assert full.names == [f"{saved}[0]", f"{saved}[3]"] and full.skipped_unreadable == [f"{saved}[1]"]


def test_missing_datasets_package_says_how_to_install(tmp_path, monkeypatch):
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_info.json").write_text("{}")
    (saved / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets fails
    with pytest.raises(ImportError, match=r'pip install "hetvae\[data\]"'):
        ImageDataset(saved, resolution=R)


# --- decoding: the EXIF orientation and the mode conversions, with no needless copy ------------------


def _reference_decode(data: bytes) -> np.ndarray:
    """What decode_image returned before it skipped its copies: transpose, then convert, always."""
    from PIL import ImageOps

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_decode_applies_the_exif_orientation(tmp_path, orientation, mode):
    from hetvae.images import decode_image

    photo = Image.fromarray(_photo(20, 32, orientation)).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    data = buffer.getvalue()
    got = decode_image(data, "x.jpg")
    assert got.shape == ((32, 20, 3) if orientation in (6, 8) else (20, 32, 3)) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, _reference_decode(data))
    (tmp_path / "x.jpg").write_bytes(data)
    np.testing.assert_array_equal(read_image(tmp_path / "x.jpg"), got)
    assert min(image_size(data)) == min(got.shape[:2])  # the header's size is before the orientation


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA", "1"])
def test_decode_converts_modes_as_before(mode):
    from hetvae.images import decode_image

    buffer = io.BytesIO()
    Image.fromarray(_photo(12, 10, 3)).convert(mode).save(buffer, format="PNG")
    np.testing.assert_array_equal(decode_image(buffer.getvalue(), "x.png"), _reference_decode(buffer.getvalue()))
