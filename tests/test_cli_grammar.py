"""One command-line grammar: a positional MODEL, --images, --out, YAML keys, --device.

Every command names its model as the first positional argument (through one helper, ``_model``),
takes images with a repeatable ``--images``, writes where ``--out`` says, and speaks the YAML keys
``--set`` takes. The old spellings are refused with an error that names what replaced them;
``hetvae config`` prints a resolved config; ``--device`` says which device it runs on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from hetvae import cli
from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL
from hetvae.build import model_architecture_kwargs
from hetvae.cli import main
from hetvae.config import Config, load_config, save_config
from hetvae.convert import load_autoencoder, save_autoencoder
from hetvae.likelihood import head_config_fields
from hetvae.schema import apply_overrides, config_to_dict


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A tiny model (factor 4) with a per-pixel head and a recorded likelihood, as one hetvae file."""
    torch.manual_seed(0)
    config = AutoencoderConfig(block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=4,
                               latent_channels=4, log_scale="pixel", log_scale_init=-2.0,
                               log_scale_head_sees_edges=True)
    return save_autoencoder(AutoencoderKL(config).eval(), tmp_path_factory.mktemp("model") / "m.safetensors")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for k, size in enumerate([(24, 32), (24, 32), (16, 40)]):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"p{k}.png")
    return folder


# --- old spellings: an error naming the new one ---------------------------------------------------

OLD = [
    (["eval", "--checkpoint", "RUN", "--images", "x"], "--checkpoint was replaced by a positional MODEL",
     "hetvae eval MODEL"),
    (["eval", "--checkpoint=RUN"], "--checkpoint was replaced by a positional MODEL", "hetvae eval MODEL"),
    (["calibrate", "--checkpoint", "RUN"], "--checkpoint was replaced by a positional MODEL", "hetvae calibrate MODEL"),
    (["uncertainty", "a.png", "--checkpoint", "RUN", "--out", "o"], "positional images by --images",
     "hetvae uncertainty MODEL --images PATH... --out DIR"),
    (["uncertainty", "RUN", "a.png", "--out", "o"], "images are given with --images", "--images PATH..."),
    (["eval", "RUN", "--json", "m.json"], "--json FILE was replaced by --out FILE", "--out FILE.json"),
    (["eval", "RUN", "--json=m.json"], "--json FILE was replaced by --out FILE", "--out FILE.json"),
    (["eval", "RUN", "photos/"], "images are given with --images", "hetvae eval MODEL"),
    (["train", "c.yaml", "--out-dir", "runs/x"], "--out-dir was replaced by --out", "hetvae train CONFIG"),
    (["train", "c.yaml", "--out-dir=runs/x"], "--out-dir was replaced by --out", "hetvae train CONFIG"),
    (["convert", "SRC", "DST", "--to", "hetvae"], "the destination is given with --out", "--out DST"),
    (["convert", "SRC", "--to", "hetvae", "--out", "D", "--log-scale", "pixel"],
     "--set log_scale.granularity=pixel", "hetvae convert MODEL"),
    (["convert", "SRC", "--to", "hetvae", "--out", "D", "--log-scale-init", "-3"], "--set log_scale.init=VALUE",
     "--set KEY=VALUE"),
    (["convert", "SRC", "--to", "hetvae", "--out", "D", "--log-scale-channels", "1"], "--set log_scale.shared=true",
     "--set KEY=VALUE"),
    (["convert", "SRC", "--to", "hetvae", "--out", "D", "--scaling-factor", "0.13"],
     "--set model.scaling_factor=VALUE", "--set KEY=VALUE"),
    (["convert", "SRC", "--to", "hetvae", "--out", "D", "--shift-factor", "0.1"], "--set model.shift_factor=VALUE",
     "--set KEY=VALUE"),
    (["convert", "SRC", "--to", "hetvae", "--out", "D", "--norm-num-groups", "8"],
     "--set model.norm_num_groups=VALUE", "--set KEY=VALUE"),
    (["shards", "photos", "shards"], "the output folder is given with --out", "hetvae shards FOLDER --out DIR"),
    (["info", "A", "B"], "info takes one MODEL", "hetvae info MODEL"),
]


@pytest.mark.parametrize("argv, replaced, usage", OLD, ids=[" ".join(a) for a, _, _ in OLD])
def test_an_old_spelling_is_refused_naming_the_new_one(capsys, argv, replaced, usage):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert replaced in err and usage in err, err
    assert "unrecognized arguments" not in err and "Traceback" not in err


@pytest.mark.parametrize("argv, missing", [(["convert", "SRC", "--to", "hetvae"], "--out"),
                                           (["shards", "photos"], "--out"),
                                           (["uncertainty", "RUN", "--out", "o"], "--images")])
def test_a_missing_output_or_image_flag_is_named(capsys, argv, missing):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"the following arguments are required: {missing}" in err, err


def test_an_unknown_option_is_still_argparses_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "RUN", "--no-such-flag"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


# --- every model named on a command line goes through _model ---------------------------------------


def test_every_command_resolves_its_model_through_one_helper(model_file, photos, tmp_path, monkeypatch):
    """Each command is given a name that is no path; ``_model`` maps it to the file, so a command
    that read its argument any other way would fail."""
    seen = []

    def resolve(text: str) -> str:
        seen.append(text)
        return str(model_file) if text == "my-model" else text

    monkeypatch.setattr(cli, "_model", resolve)
    images = ["--images", str(photos / "p0.png"), "--device", "cpu"]
    commands = [
        ["info", "my-model"],
        ["convert", "my-model", "--to", "hetvae", "--out", str(tmp_path / "c")],
        ["eval", "my-model", *images],
        ["uncertainty", "my-model", *images, "--out", str(tmp_path / "u")],
        ["compare", "my-model", "my-model", *images, "--out", str(tmp_path / "cmp")],
        ["calibrate", "my-model", "--remove", "--out", str(tmp_path / "cal"), "--device", "cpu"],
    ]
    for argv in commands:
        assert main(argv) == 0, argv
    assert seen == ["my-model"] * 7


# --- the YAML vocabulary: info prints keys --set takes; convert --set ----------------------------


def test_info_settings_are_yaml_keys_that_rebuild_the_architecture(model_file, capsys):
    assert main(["info", str(model_file), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    settings = info["settings"]
    assert settings["log_scale.granularity"] == "pixel" and settings["log_scale.init"] == -2.0
    assert settings["log_scale.head_sees_edges"] is True and settings["model.block_out_channels"] == [8, 8, 8]
    # every key is one `hetvae train --set` takes, and together they describe the same model
    cfg = apply_overrides(Config(), [f"{k}={json.dumps(v)}" for k, v in settings.items() if v is not None])
    rebuilt = AutoencoderConfig(**model_architecture_kwargs(cfg.model), log_scale="pixel",
                                **head_config_fields(cfg.log_scale))
    stored = load_autoencoder(model_file).config
    for name in [f for f in AutoencoderConfig.__dataclass_fields__ if f not in info["stored"] and f != "likelihood"]:
        assert getattr(rebuilt, name) == getattr(stored, name), name
    assert main(["info", str(model_file)]) == 0
    text = capsys.readouterr().out
    assert "  log_scale.head_sees_edges: true" in text and "  model.block_out_channels: [8, 8, 8]" in text
    settings_part = text.split("settings (YAML keys")[1].split("stored with the model")[0]
    assert "log_scale_" not in settings_part  # no Python names where YAML keys are shown


def test_convert_set_keys_do_what_the_old_flags_did(model_file, tmp_path):
    source = tmp_path / "plain"
    AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                                    latent_channels=4)).eval().save_pretrained(source)
    argv = ["convert", str(source), "--to", "hetvae", "--out", str(tmp_path / "new"), "--set",
            "log_scale.granularity=pixel", "--set", "log_scale.init=-3", "--set", "log_scale.shared=true",
            "--set", "model.scaling_factor=0.13025", "--set", "model.shift_factor=0.1"]
    assert main(argv) == 0
    got = load_autoencoder(tmp_path / "new")
    want = load_autoencoder(source, log_scale="pixel", log_scale_init=-3.0, log_scale_channels=1,
                            scaling_factor=0.13025, shift_factor=0.1)
    assert got.config == want.config
    assert got.config.log_scale_channels == 1 and got.config.log_scale_init == -3.0
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values()))


@pytest.mark.parametrize("setting, expected", [
    ("train.steps=3", ["train.steps", "convert does not use this key", "log_scale.granularity", "model.norm_num_groups"]),
    ("log_scale.granularity=channel", ["log_scale.granularity", "expected pixel", "'channel'"]),
    ("log_scale.shared=true", ["log_scale.shared", "--set log_scale.granularity=pixel"]),
    ("model.scaling_factor=abc", ["model.scaling_factor", "abc"]),
])
def test_convert_refuses_keys_it_does_not_use_and_bad_values(model_file, tmp_path, capsys, setting, expected):
    out = tmp_path / "o"
    assert main(["convert", str(model_file), "--to", "hetvae", "--out", str(out), "--set", setting]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and all(e in err for e in expected), err
    assert not out.exists()


# --- hetvae config -------------------------------------------------------------------------------


def test_config_prints_every_key_of_a_yaml_file_with_overrides(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("log_scale:\n  granularity: pixel\ntrain:\n  steps: 7\n")
    assert main(["config", str(path), "--set", "train.lr=0.001", "--set", "data.resolution=32"]) == 0
    text = capsys.readouterr().out
    want = load_config(path, ["train.lr=0.001", "data.resolution=32"])
    assert yaml.safe_load(text) == config_to_dict(want)
    assert want.train.steps == 7 and want.train.lr == 0.001 and "head_sees_edges: false" in text  # defaults too
    printed = tmp_path / "printed.yaml"
    printed.write_text(text)
    assert load_config(printed) == want  # what it prints is a config that loads back the same


def test_config_of_a_run_folder_is_its_stored_config_in_that_folder(tmp_path, capsys):
    run = tmp_path / "moved-run"
    cfg = apply_overrides(Config(), ["out_dir=/elsewhere/run", "train.steps=5"])
    save_config(cfg, run / "config.yaml")
    assert main(["config", str(run)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["steps"] == 5 and printed["out_dir"] == str(run)  # where `hetvae train RUN` trains
    assert main(["config", str(run), "--set", "out_dir=/x"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["out_dir"] == "/x"


def test_config_errors_name_the_key(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  stpes: 7\n")
    assert main(["config", str(path)]) == 1
    assert "stpes" in capsys.readouterr().err
    assert main(["config", str(tmp_path)]) == 1  # a folder that is no run
    assert "config.yaml" in capsys.readouterr().err


# --- --device ------------------------------------------------------------------------------------


def test_device_defaults_to_cuda_when_available_and_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli._device(None) == "cpu"
    assert capsys.readouterr().err == "device: cpu\n"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    assert cli._device(None) == "cuda"
    assert capsys.readouterr().err == "device: cuda (Fake GPU)\n"


@pytest.mark.parametrize("command", ["eval", "uncertainty", "compare", "calibrate"])
@pytest.mark.parametrize("device, message", [("cuda", "CUDA is not available here"),
                                             ("tpu", "expected cpu, cuda, cuda:N or mps")])
def test_a_device_that_is_not_there_is_a_clear_error(model_file, photos, tmp_path, capsys, monkeypatch, command,
                                                     device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = [command, str(model_file), "--images", str(photos), "--device", device]
    if command in ("uncertainty", "compare", "calibrate"):
        argv += ["--out", str(tmp_path / "o")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"--device {device}" in err and message in err, err
    assert not (tmp_path / "o").exists()


def test_eval_on_the_cpu_device_gives_the_default_numbers(model_file, photos, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["eval", str(model_file), "--images", str(photos), "--out", str(tmp_path / "a.json")]) == 0
    assert "device: cpu" in capsys.readouterr().err
    assert main(["eval", str(model_file), "--images", str(photos), "--device", "cpu",
                 "--out", str(tmp_path / "b.json")]) == 0
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()


# --- eval --json: the metrics on stdout -----------------------------------------------------------


def test_eval_json_prints_what_out_writes(model_file, photos, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["eval", str(model_file), "--images", str(photos), "--json", "--out", str(out), "--per-image",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == json.loads(out.read_text())  # stdout is the JSON alone
    assert f"wrote {out}" in captured.err
    assert json.loads(captured.out)["n_images"] == 3


# --- --batch-size: same-size images together, the same numbers --------------------------------------


def test_a_batch_predicts_what_each_image_alone_predicts(model_file):
    from hetvae.predictor import iter_predictions, load_predictor

    predictor = load_predictor(model_file)
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 24, 32, generator=g) * 2 - 1 for _ in range(3)] + [torch.rand(3, 16, 40, generator=g) * 2 - 1]
    alone = [predictor.predict(x) for x in images]
    together = predictor.predict_batch(images[:3])
    for a, b in zip(alone, together):
        assert torch.equal(a.target, b.target)
        torch.testing.assert_close(b.mean, a.mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(b.log_scale, a.log_scale, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="one size"):
        predictor.predict_batch(images[2:])
    named = [(f"x{k}", x) for k, x in enumerate(images)]
    streamed = list(iter_predictions(predictor, named, batch_size=2))
    assert [s for s, _ in streamed] == ["x0", "x1", "x2", "x3"]  # input order, a size change ends a batch
    for (_, p), a in zip(streamed, alone):
        torch.testing.assert_close(p.mean, a.mean, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        list(iter_predictions(predictor, named, batch_size=0))


def test_a_bad_image_in_a_batch_is_named(model_file):
    from hetvae.predictor import iter_predictions, load_predictor

    images = [("good.png", torch.zeros(3, 16, 16)), ("bad.png", torch.full((3, 16, 16), 5.0))]
    with pytest.raises(ValueError, match=r"image bad\.png: .*\[-1, 1\]"):
        list(iter_predictions(load_predictor(model_file), images, batch_size=2))


def test_eval_and_compare_with_a_batch_size_give_the_same_metrics(model_file, photos, tmp_path, capsys):
    runs = {}
    for n in (1, 2):
        assert main(["eval", str(model_file), "--images", str(photos), "--batch-size", str(n), "--per-image",
                     "--device", "cpu", "--out", str(tmp_path / f"e{n}.json")]) == 0
        runs[n] = json.loads((tmp_path / f"e{n}.json").read_text())
    assert runs[1].keys() == runs[2].keys() and runs[1]["n_images"] == 3
    for key, value in runs[1].items():
        if isinstance(value, float):
            assert runs[2][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert main(["compare", str(model_file), "--images", str(photos), "--batch-size", "3", "--device", "cpu",
                 "--out", str(tmp_path / "cmp")]) == 0
    compared = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    (row,) = compared.values()
    assert row["psnr"] == pytest.approx(runs[1]["psnr"], rel=1e-5)
    with pytest.raises(SystemExit):
        main(["eval", str(model_file), "--batch-size", "0"])
    assert "positive number of images" in capsys.readouterr().err


def test_info_text_settings_are_what_set_takes(model_file, capsys):
    """Each `KEY: VALUE` line of info's settings, passed back as `--set KEY=VALUE`, is accepted and
    gives the value info read from the file."""
    assert main(["info", str(model_file)]) == 0
    text = capsys.readouterr().out
    lines = text.split("settings (YAML keys, as --set takes them):\n")[1].split("stored with the model")[0]
    items = [line.strip().replace(": ", "=", 1) for line in lines.splitlines()]
    assert "log_scale.granularity=pixel" in items and "log_scale.init=-2.0" in items
    cfg = apply_overrides(Config(), items)
    assert cfg.log_scale.granularity == "pixel" and cfg.log_scale.head_sees_edges and cfg.model.norm_num_groups == 4
