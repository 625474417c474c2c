"""Tar shards as a training source (hetvae.shards): patterns, reading shards written by the
webdataset package and by `hetvae shards`, the order of the stream (every sample once per reader
and epoch, readers disjoint), resuming at any batch, and damaged shards. Flat-colour images: the
red value of any crop names the sample."""

from __future__ import annotations

import io
import itertools
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hetvae.cli import main as cli_main
from hetvae.data import Augment
from hetvae.distributed import stream_batches
from hetvae.schema import ConfigError
from hetvae.shards import (
    ShardStream, check_shards, expand_braces, expand_shards, first_crops, index_shard, names_shards, write_shards,
)

wds = pytest.importorskip("webdataset")

CROP = Augment(resolution=32)  # random crop and flip: a flat image's crop is its colour wherever it is


def flat_png(i: int, size: tuple[int, int] = (40, 48)) -> bytes:
    """Image ``i``: red ``i``, so a crop names its sample."""
    pixels = np.empty((*size, 3), dtype=np.uint8)
    pixels[...] = (i, 255 - i, 77)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="png")
    return out.getvalue()


def write_wds(folder: Path, counts: list[int], name: str = "train") -> str:
    """Shards of ``counts[k]`` flat images each, written by webdataset's ShardWriter; sample ``i``
    (counted over the shards) has key ``s%05d`` and a ``cls`` member. Returns a brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    i = 0
    for k, count in enumerate(counts):
        with wds.TarWriter(str(folder / f"{name}-{k:06d}.tar")) as sink:
            for _ in range(count):
                sink.write({"__key__": f"s{i:05d}", "png": flat_png(i), "cls": i})
                i += 1
    return str(folder / f"{name}-{{{0:06d}..{len(counts) - 1:06d}}}.tar")


def ids(batch: torch.Tensor) -> list[int]:
    return ((batch[:, 0, 0, 0] + 1) * 127.5).round().int().tolist()


def member_id(member: tuple[Path, str]) -> int:
    return int(member[1][1:6])


def interleave(stream: ShardStream, count: int) -> list[torch.Tensor]:
    """What a DataLoader over ``stream`` gives first: batch ``j`` from worker ``j % W``."""
    workers = [stream.worker_batches(w) for w in range(stream.workers)]
    return [next(workers[j % stream.workers]) for j in range(count)]


# --- patterns ---------------------------------------------------------------------------------


def test_brace_expansion():
    assert expand_braces("s/train-{000000..000002}.tar") == [f"s/train-00000{i}.tar" for i in range(3)]
    assert expand_braces("{8..11}") == ["8", "9", "10", "11"]
    assert expand_braces("{08..11}") == ["08", "09", "10", "11"]  # padding kept
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("{a,b}-{0..1}.tar") == ["a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"]
    assert expand_braces("x{a,b{1..2}}y") == ["xay", "xb1y", "xb2y"]
    assert expand_braces("lit{x}/{a,b}") == ["lit{x}/a", "lit{x}/b"]  # not a list or range: literal
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_names_shards_and_expansion(tmp_path):
    pattern = write_wds(tmp_path / "s", [2, 2, 2])
    assert names_shards(pattern) and names_shards([pattern, str(tmp_path / "s" / "*.tar")])
    assert not names_shards(str(tmp_path)) and not names_shards(None)
    with pytest.raises(ConfigError, match="mixes tar shards"):
        names_shards([pattern, str(tmp_path / "photos")])
    shards = expand_shards(pattern)
    assert [p.name for p in shards] == [f"train-00000{k}.tar" for k in range(3)]
    # a glob and a list: sorted, duplicates dropped
    assert expand_shards([str(tmp_path / "s" / "train-00000[21].tar"), pattern]) == [shards[1], shards[2], shards[0]]


def test_a_pattern_that_matches_nothing_names_it(tmp_path):
    write_wds(tmp_path / "s", [2, 2])
    with pytest.raises(FileNotFoundError, match=r"nothing-\*\.tar.*matches no file"):
        expand_shards(str(tmp_path / "s" / "nothing-*.tar"))
    missing = str(tmp_path / "s" / "train-{000000..000003}.tar")
    with pytest.raises(FileNotFoundError, match=r"train-\{000000\.\.000003\}\.tar.*2 of 4 files.*train-000002\.tar"):
        expand_shards(missing)


# --- reading ----------------------------------------------------------------------------------


def test_reads_webdataset_shard_writer_output(tmp_path):
    """ShardWriter's shards, images under several keys; samples without an image are passed over."""
    pattern = str(tmp_path / "w-%06d.tar")
    photo = np.random.default_rng(0).integers(0, 255, (36, 40, 3), dtype=np.uint8)
    encoded = {}
    for ext, fmt in (("jpg", "jpeg"), ("jpeg", "jpeg"), ("png", "png"), ("webp", "webp"), ("bmp", "bmp"),
                     ("tiff", "tiff")):
        out = io.BytesIO()
        Image.fromarray(photo).save(out, format=fmt)
        encoded[ext] = out.getvalue()
    with wds.ShardWriter(pattern, maxcount=4, verbose=0) as sink:
        for i, (ext, data) in enumerate(encoded.items()):
            sink.write({"__key__": f"k{i}", ext: data, "json": {"i": i}})
        sink.write({"__key__": "text-only", "txt": "no image here"})
    shards = expand_shards(str(tmp_path / "w-*.tar"))
    assert len(shards) == 2
    names = [n for s in shards for n in index_shard(s).names]
    assert names == [f"k{i}.{ext}" for i, ext in enumerate(encoded)]
    from hetvae.images import decode_image

    for shard in shards:
        index = index_shard(shard)
        with open(shard, "rb") as f:
            for i, name in enumerate(index.names):
                pixels = decode_image(index.read(f, i), name)
                lossless = not name.endswith(("jpg", "jpeg", "webp"))
                assert pixels.shape == photo.shape and (not lossless or np.array_equal(pixels, photo)), name


def test_hetvae_shards_writes_what_the_reader_and_webdataset_read(tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    files = {}
    for i in range(5):
        path = folder / ("sub" if i % 2 else "") / f"p{i}.{'png' if i < 3 else 'JPG'}"
        Image.fromarray(np.full((40, 40, 3), 10 * i, np.uint8)).save(path, format="png" if i < 3 else "jpeg")
        files[path.relative_to(folder).as_posix()] = path.read_bytes()
    out = tmp_path / "out"
    assert cli_main(["shards", str(folder), "--out", str(out), "--size", "2"]) == 0
    printed = capsys.readouterr().out
    pattern = str(out / "shard-{000000..000002}.tar")
    assert f"data.path: {pattern}" in printed and "5 image(s) into 3 shard(s)" in printed
    shards = expand_shards(pattern)
    got = {}
    for shard in shards:
        index = index_shard(shard)
        with open(shard, "rb") as f:
            for i in range(len(index)):
                got[index.names[i]] = index.read(f, i)
    assert sorted(got.values()) == sorted(files.values())  # the original bytes
    assert all(n.split(".")[0].isdigit() and len(n.split(".")[0]) == 9 for n in got)
    # webdataset reads them as samples: the image, and the source path beside it
    samples = list(wds.WebDataset(pattern, shardshuffle=False, empty_check=False))
    assert len(samples) == 5
    import json

    sources = {json.loads(s["json"])["source"]: s.get("png", s.get("jpg")) for s in samples}
    assert sources == files
    # the same files give the same bytes; existing shards are refused, --overwrite replaces them
    before = [p.read_bytes() for p in shards]
    assert cli_main(["shards", str(folder), "--out", str(out)]) == 1
    assert "already holds 3 shard(s)" in capsys.readouterr().err
    assert cli_main(["shards", str(folder), "--out", str(out), "--size", "2", "--overwrite"]) == 0
    assert [p.read_bytes() for p in shards] == before
    assert cli_main(["shards", str(folder), "--out", str(out), "--size", "10", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar"]
    with pytest.raises(SystemExit) as exited:
        cli_main(["shards", str(folder), "--out", str(out), "--size", "0"])
    assert exited.value.code == 2
    assert cli_main(["shards", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 1
    assert not (tmp_path / "o2").exists()


# --- the order --------------------------------------------------------------------------------

COUNTS = [5, 7, 3, 6, 4, 8, 2, 5]  # 40 samples in 8 shards of different sizes


@pytest.mark.parametrize("shuffle_shards", [1, 2, 3])
def test_every_sample_once_per_slot_epoch_and_slots_disjoint(tmp_path, shuffle_shards):
    """World size 2 x 2 workers: 4 readers. In each epoch their samples partition the shards'
    samples, and what each worker's batches hold is its slot's epochs in order (a batch straddles
    two epochs)."""
    shards = expand_shards(write_wds(tmp_path, COUNTS))
    every = list(range(sum(COUNTS)))
    streams = [ShardStream(shards, augment=CROP, batch=3, seed=5, rank=r, world_size=2, num_workers=2,
                           shuffle_shards=shuffle_shards) for r in (0, 1)]
    for epoch in (0, 1):
        seen = [[member_id(m) for m in streams[0].epoch_members(epoch, slot)] for slot in range(4)]
        assert sorted(itertools.chain(*seen)) == every  # each sample once, in exactly one slot
        shard_sets = [set(streams[0].epoch_shards(epoch, slot)) for slot in range(4)]
        assert sorted(itertools.chain(*shard_sets)) == list(range(8))
    first = [member_id(m) for m in streams[0].epoch_members(0, 0)]
    assert first != [member_id(m) for m in streams[0].epoch_members(1, 0)]
    for rank, stream in enumerate(streams):
        for worker in (0, 1):
            slot = rank * 2 + worker
            assert stream.slot_of(worker) == (slot, 0)
            got = list(itertools.chain(*(ids(b) for b in itertools.islice(stream.worker_batches(worker), 8))))
            expected = [member_id(m) for e in (0, 1, 2) for m in stream.epoch_members(e, slot)]
            assert got == expected[:24]


def test_each_crop_is_the_documented_function_of_its_position(tmp_path):
    """Sample p of slot s's epoch e: every draw from default_rng((seed, e, s, p)), the procedural
    draw first (ImageDataset's pool of dead-leaves images), then the crop of hetvae.data.Augment."""
    from hetvae.images import decode_image
    from hetvae.procedural import dead_leaves

    rng = np.random.default_rng(0)
    for k, count in enumerate([4, 5, 3]):
        with wds.TarWriter(str(tmp_path / f"t-{k:06d}.tar")) as sink:
            for i in range(count):
                out = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(out, format="png")
                sink.write({"__key__": f"k{k}_{i}", "png": out.getvalue()})
    shards = expand_shards(str(tmp_path / "t-*.tar"))
    crop = Augment(resolution=16, rescale=(0.5, 1.0), color_jitter=0.1)
    stream = ShardStream(shards, augment=crop, batch=4, seed=11, shuffle_shards=2, procedural=0.3)
    got = torch.cat(list(itertools.islice(iter(stream), 4)))  # epoch 0's 12 samples, then 4 of epoch 1
    expected, procedural = [], 0
    for epoch in (0, 1):
        for p, (shard, name) in enumerate(stream.epoch_members(epoch, 0)):
            draws = np.random.default_rng((11, epoch, 0, p))
            if draws.random() < 0.3:
                procedural += 1
                pixels = dead_leaves(32, np.random.default_rng((11, 0x5EED, int(draws.integers(64)))))
            else:
                index = index_shard(shard)
                with open(shard, "rb") as f:
                    pixels = decode_image(index.read(f, index.names.index(name)), name)
            expected.append(crop(pixels, draws))
    assert 0 < procedural and all(torch.equal(a, b) for a, b in zip(got, expected[:16]))


def test_shuffle_groups_mix_the_shards_of_a_group(tmp_path):
    shards = expand_shards(write_wds(tmp_path, [6, 6, 6, 6]))
    stream = ShardStream(shards, augment=CROP, batch=4, seed=0, shuffle_shards=2)
    members = stream.epoch_members(0, 0)
    order = stream.epoch_shards(0, 0)
    first_group = {shards[s] for s in order[:2]}
    assert {m[0] for m in members[:12]} == first_group  # the group's two shards, and only they
    assert len({m[0] for m in members[:6]}) == 2  # interleaved, not one shard then the other


def test_same_seed_same_batches_and_another_seed_others(tmp_path):
    shards = expand_shards(write_wds(tmp_path, [4, 4, 4], name="a"))
    crop = Augment(resolution=16, rescale=(0.5, 1.0), color_jitter=0.1)
    make = lambda seed: ShardStream(shards, augment=crop, batch=4, seed=seed, procedural=0.3)  # noqa: E731
    a, b, c = (list(itertools.islice(iter(make(s)), 5)) for s in (1, 1, 2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_a_stream_started_at_any_batch_continues_the_uninterrupted_one(tmp_path):
    """Per worker, the samples it skips are counted from the tar headers: started at batch k, the
    stream's batches are batches k, k+1, ... of the stream started at 0, for every k."""
    shards = expand_shards(write_wds(tmp_path, COUNTS))
    make = lambda start: ShardStream(shards, augment=CROP, batch=3, seed=9, rank=1, world_size=2,  # noqa: E731
                                     num_workers=2, shuffle_shards=2, start=start)
    full = interleave(make(0), 24)
    for start in (1, 2, 5, 9, 14):
        resumed = interleave(make(start), 6)
        assert all(torch.equal(x, y) for x, y in zip(resumed, full[start : start + 6])), start


def test_a_real_dataloader_with_two_workers(tmp_path):
    """The DataLoader takes its workers' batches in turn: the same batches as computed by hand,
    from the start and from a resume at an odd batch (whose first batch is worker 1's slot's)."""
    shards = expand_shards(write_wds(tmp_path, COUNTS))
    make = lambda start: ShardStream(shards, augment=CROP, batch=3, seed=2, num_workers=2, start=start)  # noqa: E731
    expected = interleave(make(0), 9)
    got = list(itertools.islice(stream_batches(make(0), num_workers=2), 6))
    assert all(torch.equal(x, y) for x, y in zip(got, expected[:6]))
    got = list(itertools.islice(stream_batches(make(3), num_workers=2), 6))
    assert all(torch.equal(x, y) for x, y in zip(got, expected[3:9]))


def test_an_origin_restarts_every_slot_at_its_epoch(tmp_path):
    shards = expand_shards(write_wds(tmp_path, COUNTS))
    stream = ShardStream(shards, augment=CROP, batch=2, seed=4, world_size=1, num_workers=2, start=7, origin=(3, 7))
    for worker in (0, 1):
        slot, made = stream.slot_of(worker)
        assert made == 0 and stream.position(slot, 0) == (3, 0)
        assert ids(next(stream.worker_batches(worker))) == [member_id(m) for m in stream.epoch_members(3, slot)[:2]]
    # where a layout has got to: the furthest epoch over its slots
    later = ShardStream(shards, augment=CROP, batch=8, seed=4, world_size=1, num_workers=2, start=9)
    reached = []
    for worker in (0, 1):
        slot, made = later.slot_of(worker)
        reached.append(later.position(slot, made * 8)[0])
    assert later.furthest_epoch() == max(reached) >= 1


# --- damaged and unusable shards ---------------------------------------------------------------


def _member_offsets(path: Path) -> dict[str, tuple[int, int]]:
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}


@pytest.mark.parametrize("cut", ["data", "header"])
def test_a_truncated_shard_is_read_up_to_where_it_breaks(tmp_path, cut):
    shards = expand_shards(write_wds(tmp_path, [6, 5]))
    offsets = _member_offsets(shards[0])
    header, data = offsets["s00003.png"]
    size = data + 10 if cut == "data" else header + 100
    with open(shards[0], "r+b") as f:
        f.truncate(size)
    with pytest.warns(UserWarning) as caught:
        index = index_shard(shards[0])
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and str(shards[0]) in messages[0], messages
    if cut == "data":
        assert "member 's00003.png' extends past the end of the file" in messages[0]
    else:
        assert "breaks off after member 's00003.cls'" in messages[0] or "breaks off after member 's00002.png'" in messages[0]
    assert [n for n in index.names] == ["s00000.png", "s00001.png", "s00002.png"]
    # the stream reads the rest: 3 + 5 samples per epoch
    stream = ShardStream(shards, augment=CROP, batch=8, seed=0, shuffle_shards=2)
    assert sorted(ids(next(iter(stream)))) == [0, 1, 2, 6, 7, 8, 9, 10]


def test_an_undecodable_member_and_a_small_image_are_replaced_with_one_warning_each(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    with wds.TarWriter(str(folder / "bad-000000.tar")) as sink:
        for i in range(6):
            data = b"not an image" if i == 2 else flat_png(i, (20, 20)) if i == 4 else flat_png(i)
            sink.write({"__key__": f"s{i:05d}", "png": data})
    shards = expand_shards(str(folder / "bad-000000.tar"))
    stream = ShardStream(shards, augment=CROP, batch=6, seed=1)
    order = [member_id(m) for m in stream.epoch_members(0, 0)]
    expected = [next(order[(q + d) % 6] for d in range(6) if order[(q + d) % 6] not in (2, 4)) for q in range(6)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(itertools.islice(iter(stream), 3))  # three epochs
    assert ids(batches[0]) == expected
    named = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(named) == 2, named  # once each, however often they come round
    assert any("s00002.png" in m and "bad-000000.tar" in m and "cannot read image" in m for m in named)
    assert any("s00004.png" in m and "20x20 is smaller than the 32x32 crop" in m for m in named)


def test_empty_shards_and_too_few_shards_are_refused(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    for k in range(2):
        with wds.TarWriter(str(folder / f"e-{k:06d}.tar")) as sink:
            sink.write({"__key__": "a", "txt": "text"})
    shards = expand_shards(str(folder / "e-*.tar"))
    with pytest.warns(UserWarning, match=r"e-000000\.tar holds no image member"):
        with pytest.raises(ValueError, match="none of the 2 tar shard"):
            check_shards(shards, global_batch=4, slots=1, workers=1, world_size=1)
    shards = expand_shards(write_wds(tmp_path / "t", [3, 3]))
    with pytest.raises(ValueError, match=r"2 tar shard\(s\) for 4 readers \(world size 2 x 2 data worker\(s\)\).*"
                                         r"hetvae shards.*data.num_workers"):
        check_shards(shards, global_batch=4, slots=4, workers=2, world_size=2)
    with pytest.raises(ValueError, match="hold 6 image"):
        check_shards(shards, global_batch=8, slots=2, workers=2, world_size=1)
    with pytest.raises(ValueError, match="for 3 readers"):
        ShardStream(shards, augment=CROP, batch=2, seed=0, num_workers=3)


def test_first_crops_for_the_sample_panel(tmp_path):
    shards = expand_shards(write_wds(tmp_path, [2, 3]))
    crops = first_crops(shards, 4, 64, least=32)  # the images are 40x48: the training side
    assert crops.shape == (4, 3, 32, 32) and ids(crops) == [0, 1, 2, 3]
    assert first_crops(shards, 2, 40, least=32).shape == (2, 3, 40, 40)


def test_write_shards_function(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(flat_png(i))
    written = write_shards(folder, tmp_path / "o", size=2)
    assert written.images == 3 and [p.name for p in written.paths] == ["shard-000000.tar", "shard-000001.tar"]
    assert expand_shards(written.pattern) == written.paths
