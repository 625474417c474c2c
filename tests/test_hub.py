"""Hugging Face Hub ids wherever a model is named (hetvae.hub), checked against a Hub cache built in
a temporary folder as huggingface_hub lays it out (``models--org--name/refs/REV`` holding a commit,
``snapshots/COMMIT/...`` links into ``blobs/``), read with ``HF_HUB_OFFLINE=1``: no test reaches the
network. The online paths (a repository or file that does not exist) run against stand-ins for
huggingface_hub's two network calls."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

import hetvae
from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL
from hetvae.config import Config, ModelConfig, with_absolute_paths
from hetvae.convert import inspect_checkpoint, load_autoencoder
from hetvae.hub import HubName, is_hub_id, parse_hub_name, resolve_model
from hetvae.likelihood import Likelihood

huggingface_hub = pytest.importorskip("huggingface_hub")
hf_constants = pytest.importorskip("huggingface_hub.constants")

TINY = {"block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 32}
CALIBRATION = {"method": "affine", "family": "laplace", "slope": [0.8, 1.1, 1.3], "offset": [0.2, -0.1, 0.05]}


def tiny_model(seed: int, *, head: bool = True, calibrated: bool = True) -> AutoencoderKL:
    """A small VAE with non-trivial weights everywhere; with a head and a calibrated likelihood."""
    likelihood = Likelihood(granularity="pixel", bounds=(-5.0, 1.5), margin=0.5,
                            calibration=CALIBRATION if calibrated else None) if head else None
    torch.manual_seed(seed)
    model = AutoencoderKL(AutoencoderConfig(**TINY, log_scale="pixel" if head else None, likelihood=likelihood))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def assert_same_model(got: AutoencoderKL, want: AutoencoderKL) -> None:
    got_sd, want_sd = got.state_dict(), want.state_dict()
    assert sorted(got_sd) == sorted(want_sd)
    for k, v in want_sd.items():
        assert torch.equal(got_sd[k].float(), v.float()), k
    assert got.config.likelihood == want.config.likelihood


class HubCache:
    """A Hugging Face cache in a folder: ``put`` lays out one revision of a repository."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def put(self, repo_id: str, source: Path, *, under: str = "", revision: str = "main") -> str:
        """Every file below ``source`` (a folder or one file) as ``under/...`` of ``repo_id`` at
        ``revision``; returns the commit, a hash of the content."""
        repo = self.root / ("models--" + repo_id.replace("/", "--"))
        files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
        digest = hashlib.sha1(b"".join(p.read_bytes() for p in files) + under.encode()).hexdigest()
        snapshot = repo / "snapshots" / digest
        for f in files:
            rel = f.relative_to(source) if source.is_dir() else Path(f.name)
            blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, blob)
            link = snapshot / under / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(digest)
        return digest


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty Hub cache, huggingface_hub offline and pointed at it (the environment too)."""
    root = tmp_path / "hf-cache"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(root))
    return HubCache(root)


@pytest.fixture
def hub(cache, tmp_path):
    """The cache holding: ``org/vae`` (a diffusers VAE with head and calibration at its root; revision
    ``v2`` another model; an fp16 variant of a third), ``org/pipe`` (a pipeline whose ``vae/`` is
    a fourth), ``org/single`` (an ldm single file with its head file beside it, in ``weights/``)."""
    models = {name: tiny_model(seed) for seed, name in enumerate(["main", "v2", "fp16", "pipe", "single"])}
    with torch.no_grad():  # a variant shares the folder's one head file: fp16 differs from main elsewhere
        models["fp16"].decoder.log_scale_head.load_state_dict(models["main"].decoder.log_scale_head.state_dict())
    exports = tmp_path / "exports"
    for name, model in models.items():
        if name == "fp16":
            continue
        fmt = "ldm" if name == "single" else "diffusers"
        model.save_pretrained(exports / name / ("vae.safetensors" if fmt == "ldm" else ""), format=fmt)
    models["fp16"].half().save_pretrained(exports / "fp16", format="diffusers", variant="fp16")
    models["fp16"].float()
    shutil.copyfile(exports / "fp16" / "diffusion_pytorch_model.fp16.safetensors",
                    exports / "main" / "diffusion_pytorch_model.fp16.safetensors")
    commits = {"main": cache.put("org/vae", exports / "main"), "v2": cache.put("org/vae", exports / "v2", revision="v2")}
    (exports / "pipe" / "model_index.json").write_text("{}")
    cache.put("org/pipe", exports / "pipe", under="vae")
    cache.put("org/single", exports / "single", under="weights")
    return models, commits


# --- the grammar -------------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("org/name", HubName("org/name")),
    ("stabilityai/sd-vae-ft-mse", HubName("stabilityai/sd-vae-ft-mse")),
    ("org/name/vae", HubName("org/name", "vae")),
    ("org/name/a/b", HubName("org/name", "a/b")),
    ("org/name/vae-ft-mse-840000-ema-pruned.safetensors",
     HubName("org/name", "vae-ft-mse-840000-ema-pruned.safetensors", is_file=True)),
    ("org/name/sub/model.CKPT", HubName("org/name", "sub/model.CKPT", is_file=True)),
    ("org/name@v2", HubName("org/name", revision="v2")),
    ("org/name/vae@refs/pr/3", HubName("org/name", "vae", revision="refs/pr/3")),
    ("org/my.model_v1", HubName("org/my.model_v1")),
])
def test_hub_names_parse(name, expected):
    assert parse_hub_name(name) == expected
    assert str(expected) == name


@pytest.mark.parametrize("name", [
    "model.safetensors", "/abs/org/name", "./org/name", "../org/name", "~/org/name", "org\\name", "org",
    "org/", "org//vae", "org/name@", "-org/name", "org/name-", "org/na--me", "org/na..me", "org/na me",
    "org/name/../x", "org/name/./x", "",
])
def test_what_is_not_a_hub_id(name):
    assert parse_hub_name(name) is None


def test_a_path_object_or_an_existing_path_is_never_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("org/name") and not is_hub_id(Path("org/name"))
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not is_hub_id("org/name")


# --- every entry point -------------------------------------------------------------------------


def test_load_autoencoder_and_inspect_read_a_cached_repository(hub):
    models, commits = hub
    model = load_autoencoder("org/vae")
    assert_same_model(model, models["main"])
    assert model.has_log_scale_head and model.calibration is not None
    info = inspect_checkpoint("org/vae")
    assert info.format == "diffusers" and info.head_file is not None
    assert info.path.parts[-3:] == ("models--org--vae", "snapshots", commits["main"])


def test_revision_as_suffix_argument_or_commit(hub):
    models, commits = hub
    assert_same_model(load_autoencoder("org/vae@v2"), models["v2"])
    assert_same_model(load_autoencoder(f"org/vae@{commits['v2']}"), models["v2"])
    assert_same_model(AutoencoderKL.from_pretrained("org/vae", revision="v2"), models["v2"])
    assert_same_model(AutoencoderKL.from_pretrained("org/vae@v2", revision="v2"), models["v2"])
    with pytest.raises(ValueError, match="names revision 'v2' but revision='main' was given"):
        resolve_model("org/vae@v2", revision="main")


def test_variant_reads_the_variant_weights(hub):
    models, _ = hub
    main = models["main"].state_dict()
    want = {k: main[k] if "log_scale_head" in k else v.half() for k, v in models["fp16"].state_dict().items()}
    for half in (AutoencoderKL.from_pretrained("org/vae", variant="fp16"), load_autoencoder("org/vae", variant="fp16")):
        assert half.dtype == torch.float32  # built in float32, the fp16 weights upcast
        got = half.state_dict()
        assert sorted(got) == sorted(want)
        assert [k for k, v in want.items() if not torch.equal(got[k], v.float())] == []
    assert not torch.equal(got["decoder.conv_out.weight"], models["main"].state_dict()["decoder.conv_out.weight"])
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.ema\.safetensors"):
        load_autoencoder("org/vae", variant="ema")


def test_pickled_weights_when_a_folder_has_no_safetensors(cache, tmp_path):
    model = tiny_model(7, head=False)
    model.save_pretrained(tmp_path / "bin", format="diffusers", safe_serialization=False)
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").is_file()
    cache.put("org/old", tmp_path / "bin")
    assert_same_model(load_autoencoder("org/old"), model)


def test_a_pipeline_subfolder_in_the_name_or_as_subfolder(hub):
    models, _ = hub
    want = models["pipe"]
    assert_same_model(load_autoencoder("org/pipe/vae"), want)
    assert_same_model(AutoencoderKL.from_pretrained("org/pipe", subfolder="vae"), want)
    assert_same_model(load_autoencoder("org/pipe"), want)  # a pipeline's root: its vae/, as for a folder
    assert_same_model(AutoencoderKL.from_pretrained("org/pipe", subfolder="vae", torch_dtype=torch.float64),
                      want.double())


def test_a_pipeline_vae_from_a_hub_id(hub):
    pytest.importorskip("diffusers")
    models, _ = hub
    vae = hetvae.PipelineAutoencoderKL.from_pretrained("org/pipe", subfolder="vae")
    assert type(vae).__name__ == "PipelineAutoencoderKL"
    assert_same_model(vae, models["pipe"])


def test_a_single_file_and_the_head_beside_it(hub):
    models, _ = hub
    model = load_autoencoder("org/single/weights/vae.safetensors")
    assert_same_model(model, models["single"])
    assert model.has_log_scale_head
    with pytest.raises(ValueError, match="variant applies to a diffusers folder"):
        load_autoencoder("org/single/weights/vae.safetensors", variant="fp16")


def test_build_model_init_from_a_hub_id_and_the_run_config_keeps_it(hub):
    models, _ = hub
    cfg = Config(model=ModelConfig(init_from="org/vae@v2"))
    assert with_absolute_paths(cfg).model.init_from == "org/vae@v2"
    model = hetvae.build_model(cfg)
    torch.testing.assert_close(model.state_dict()["decoder.conv_out.weight"],
                               models["v2"].state_dict()["decoder.conv_out.weight"], rtol=0, atol=0)



def test_a_relative_init_from_that_exists_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = Config(model=ModelConfig(init_from="runs/x"))
    assert with_absolute_paths(cfg).model.init_from == "runs/x"  # no such folder: a Hub id
    (tmp_path / "runs" / "x").mkdir(parents=True)
    assert with_absolute_paths(cfg).model.init_from == str(tmp_path / "runs" / "x")


def test_load_predictor_scores_a_hub_model_calibrated(hub):
    from hetvae.predictor import load_predictor

    models, _ = hub
    predictor = load_predictor("org/pipe/vae")
    assert_same_model(predictor.model, models["pipe"])
    assert predictor.calibration is not None and predictor.calibration.method == "affine"
    assert load_predictor("org/pipe/vae", calibrated=False).calibration is None


def test_attach_log_scale_head_from_a_hub_id(hub):
    diffusers = pytest.importorskip("diffusers")
    models, _ = hub
    stock = diffusers.AutoencoderKL.from_pretrained(resolve_model("org/vae")).eval()
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dec = hetvae.attach_log_scale_head(stock, "org/vae")
        want = models["main"].decode(z).log_scale  # a calibrated model: the bounded, calibrated map
        torch.testing.assert_close(dec.decode(z).log_scale, want, rtol=0, atol=1e-4)
        head_only = hetvae.attach_log_scale_head(stock, "org/vae/log_scale_head.safetensors")
        assert head_only.calibration is not None  # its config.json came with it
        torch.testing.assert_close(head_only.decode(z).log_scale, want, rtol=0, atol=1e-4)


def test_a_local_path_wins_over_the_cache(hub, tmp_path, monkeypatch):
    models, _ = hub
    monkeypatch.chdir(tmp_path)
    models["v2"].save_pretrained(tmp_path / "org" / "vae", format="diffusers")
    assert resolve_model("org/vae") == Path("org/vae")
    assert_same_model(load_autoencoder("org/vae"), models["v2"])
    with pytest.raises(ValueError, match="revision='v2' chooses a revision of a Hub repository, but org/vae is a local path"):
        AutoencoderKL.from_pretrained("org/vae", revision="v2")


# --- errors ------------------------------------------------------------------------------------


def test_offline_and_not_cached_names_the_id_the_cache_and_the_download(cache):
    with pytest.raises(FileNotFoundError) as error:
        load_autoencoder("stabilityai/sd-vae-ft-mse")
    text = str(error.value)
    assert text.startswith("stabilityai/sd-vae-ft-mse: not in the Hugging Face cache " + str(cache.root))
    assert "HF_HUB_OFFLINE=1" in text
    assert "`hf download stabilityai/sd-vae-ft-mse config.json diffusion_pytorch_model.safetensors` (a pipeline " \
           "repository: name its VAE folder, stabilityai/sd-vae-ft-mse/vae)" in text
    with pytest.raises(FileNotFoundError, match=r'hf download org/pipe --include "vae/\*" --revision v9`'):
        AutoencoderKL.from_pretrained("org/pipe", subfolder="vae", revision="v9")


def test_a_folder_or_file_missing_from_a_cached_snapshot(hub):
    with pytest.raises(FileNotFoundError, match=r"org/pipe/unet: not in the Hugging Face cache .*\(VAE in its folder "
                                                r"'unet'.* is not cached\).*--include \"unet/\*\""):
        load_autoencoder("org/pipe/unet")
    with pytest.raises(FileNotFoundError, match=r"file 'weights/other\.safetensors' is not cached.*"
                                                r"hf download org/single weights/other\.safetensors"):
        load_autoencoder("org/single/weights/other.safetensors")


def test_local_files_only_reads_the_cache_only(hub, cache, monkeypatch):
    models, _ = hub
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    assert_same_model(AutoencoderKL.from_pretrained("org/vae", local_files_only=True), models["main"])
    with pytest.raises(FileNotFoundError, match=r"org/nothing: not in the Hugging Face cache .*local_files_only=True"):
        AutoencoderKL.from_pretrained("org/nothing", local_files_only=True)
    elsewhere = cache.root.parent / "other-cache"
    with pytest.raises(FileNotFoundError, match=f"org/vae: not in the Hugging Face cache {elsewhere} .*"
                                                f"`hf download org/vae config.json diffusion_pytorch_model.safetensors "
                                                f"--cache-dir {elsewhere}`"):
        AutoencoderKL.from_pretrained("org/vae", local_files_only=True, cache_dir=elsewhere)
    assert_same_model(AutoencoderKL.from_pretrained("org/vae", local_files_only=True, cache_dir=cache.root),
                      models["main"])


@pytest.mark.parametrize("name", ["no such/thing here", "org/na--me/vae"])
def test_a_malformed_name_lists_the_forms(cache, name):
    with pytest.raises(FileNotFoundError, match="no such file or directory, nor a Hub id; a model is named by a local "
                                                "file or folder, or a Hugging Face Hub id: 'org/name', 'org/name/sub/folder'"):
        load_autoencoder(name)


def test_a_missing_local_file_keeps_its_plain_error(cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors: no such file or directory$"):
        load_autoencoder("nothing.safetensors")
    with pytest.raises(FileNotFoundError, match="model.init_from: .*missing: no such file or directory$"):
        hetvae.build_model(Config(model=ModelConfig(init_from=str(tmp_path / "missing"))))


def _repository_not_found():
    from huggingface_hub.utils import RepositoryNotFoundError

    error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # what a 404 from the Hub raises
    Exception.__init__(error, "404 Client Error")
    return error


def test_online_a_repository_that_does_not_exist(cache, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)

    def snapshot_download(repo_id, **kwargs):
        raise _repository_not_found()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(FileNotFoundError, match=r"org/nothing: no such local file or folder, and no Hugging Face Hub "
                                                r"repository 'org/nothing' \(or it is private"):
        load_autoencoder("org/nothing")


def test_online_a_repository_without_a_vae_lists_its_files(cache, tmp_path, monkeypatch):
    # what huggingface_hub does online when no file matches the patterns: an empty snapshot folder
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    empty = tmp_path / "snapshot"
    empty.mkdir()
    calls = []

    def snapshot_download(repo_id, *, revision, allow_patterns, **kwargs):
        calls.append(allow_patterns)
        return str(empty)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, **kw: ["README.md", "unet/config.json"])
    with pytest.raises(FileNotFoundError, match=r"org/text: the Hub repository org/text \(revision 'main'\) has no VAE in "
                                                r"its root \(nor vae/\).*its files: README.md, unet/config.json"):
        load_autoencoder("org/text")
    # safetensors first, then .bin, as diffusers looks; config and head files in both
    assert "diffusion_pytorch_model.safetensors" in calls[0] and "vae/diffusion_pytorch_model.safetensors" in calls[0]
    assert "diffusion_pytorch_model.bin" in calls[1] and "log_scale_head.safetensors" in calls[1]
    assert not any(p.endswith(".bin") for p in calls[0])


@pytest.mark.parametrize("kwargs, error, match", [
    ({"subfolder": "../vae"}, ValueError, "subfolder must be a relative folder name such as 'vae', got '../vae'"),
    ({"subfolder": "/vae"}, ValueError, "subfolder must be a relative folder name"),
    ({"revision": " "}, ValueError, "revision must be a branch, tag or commit name, got ' '"),
    ({"variant": "fp16/../x"}, ValueError, "variant must be None or a name of letters"),
])
def test_malformed_arguments_are_refused_before_any_lookup(cache, kwargs, error, match):
    with pytest.raises(error, match=match):
        resolve_model("org/vae", **kwargs)


def test_a_name_that_is_no_string_or_path(cache):
    with pytest.raises(TypeError, match="a model is named by a str or a path, got int"):
        resolve_model(3)


# --- the command line --------------------------------------------------------------------------


def test_the_commands_take_a_hub_id_as_model(hub, tmp_path, capsys):
    """info, eval, convert and calibrate read a cached Hub id as their MODEL, offline."""
    import json

    from hetvae.cli import main
    from hetvae.predictor import load_predictor

    models, _ = hub
    assert main(["info", "org/pipe/vae", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["settings"]["log_scale.granularity"] == "pixel"
    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image

    for i in range(2):
        pixels = torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(i))
        Image.fromarray((pixels * 255).round().byte().numpy()).save(photos / f"p{i}.png")
    assert main(["eval", "org/pipe/vae", "--images", str(photos), "--json", "--device", "cpu"]) == 0
    scored = json.loads(capsys.readouterr().out)
    from hetvae.evaluate import evaluate
    from hetvae.images import load_images

    want = evaluate(load_predictor("org/pipe/vae"), load_images([photos]))
    assert scored["nll_bpd"] == pytest.approx(want["nll_bpd"], rel=1e-6)
    out = tmp_path / "converted"
    assert main(["convert", "org/vae@v2", "--to", "hetvae", "--out", str(out)]) == 0
    assert_same_model(load_autoencoder(out), models["v2"])
    assert main(["info", "org/absent"]) == 1
    assert "org/absent" in capsys.readouterr().err
