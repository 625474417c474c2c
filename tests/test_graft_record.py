"""Grafting a per-pixel log-scale head changes the likelihood: the model's record becomes the
per-pixel one (family, bounds and margin kept) and a post-hoc calibration fitted for the old scale
is dropped with a note, on every path that grafts a head (``hetvae convert --set log_scale.granularity=pixel``,
``load_autoencoder(..., log_scale="pixel")``, ``AutoencoderKL.from_pretrained`` with head
overrides, ``AutoencoderKL.add_log_scale_head``)."""

from __future__ import annotations

import warnings

import pytest
import torch

from hetvae import AutoencoderConfig, AutoencoderKL, Likelihood
from hetvae.build import model_nll
from hetvae.cli import main
from hetvae.convert import load_autoencoder
from hetvae.likelihood import CalibrationDropped
from hetvae.predictor import load_predictor

TINY = {"block_out_channels": (16, 32), "norm_num_groups": 8, "layers_per_block": 1, "latent_channels": 4}
CALIBRATION = {"method": "affine", "family": "gaussian", "slope": [1.0, 1.0, 1.0], "offset": [0.7, -0.4, 0.2]}


def global_record(calibrated: bool = True, fit: str = "learned") -> Likelihood:
    return Likelihood(
        granularity="global", family="gaussian", bounds=(-6.0, 2.0), margin=0.5, fit=fit, init=-1.0,
        free=(0.3,) if fit == "learned" else None, calibration=dict(CALIBRATION) if calibrated else None,
    )


def model_with(record: Likelihood | None) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(AutoencoderConfig(**TINY, likelihood=record)).eval()


def saved(tmp_path, record: Likelihood | None, name: str = "src"):
    model_with(record).save_pretrained(tmp_path / name)
    return tmp_path / name


def assert_pixel_record(model: AutoencoderKL, init: float) -> None:
    lik = model.config.likelihood
    assert lik is not None and lik.granularity == "pixel", lik
    assert lik.family == "gaussian" and lik.bounds == (-6.0, 2.0) and lik.margin == 0.5
    assert lik.fit == "learned" and lik.free is None and lik.init == init
    assert lik.calibration is None and model.calibration is None
    # scored with the head's map, not the old global scale
    nll = model_nll(model)
    assert nll.granularity == "pixel" and nll.family == "gaussian"
    # decode returns the fresh head's raw map: no global correction applied to it
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        s = model.decode(z).log_scale
    torch.testing.assert_close(s, torch.full_like(s, init))


def test_convert_log_scale_pixel_on_a_calibrated_global_model(tmp_path, capsys):
    src = saved(tmp_path, global_record())
    with pytest.warns(CalibrationDropped, match="calibration"):
        assert main(["convert", str(src), "--to", "hetvae", "--set", "log_scale.granularity=pixel", "--out", str(tmp_path / "out")]) == 0
    out = load_autoencoder(tmp_path / "out")
    assert out.has_log_scale_head
    assert_pixel_record(out, 0.0)
    predictor = load_predictor(tmp_path / "out")  # what `hetvae eval` scores
    assert predictor.granularity == "pixel" and predictor.family == "gaussian" and predictor.calibration is None


@pytest.mark.parametrize("to", ["diffusers", "ldm"])
def test_convert_to_other_formats_records_the_pixel_likelihood(tmp_path, to):
    src = saved(tmp_path, global_record())
    with pytest.warns(CalibrationDropped):
        assert main(["convert", str(src), "--to", to, "--set", "log_scale.granularity=pixel", "--set", "log_scale.init=-2.5", "--out", str(tmp_path / "out")]) == 0
    assert_pixel_record(load_autoencoder(tmp_path / "out"), -2.5)


def test_load_autoencoder_and_from_pretrained_graft(tmp_path):
    src = saved(tmp_path, global_record())
    with pytest.warns(CalibrationDropped):
        assert_pixel_record(load_autoencoder(src, log_scale="pixel"), 0.0)
    with pytest.warns(CalibrationDropped):
        model = AutoencoderKL.from_pretrained(src, log_scale="pixel", log_scale_init=-3.0, log_scale_channels=1)
    assert model.config.head_channels == 1
    assert_pixel_record(model, -3.0)
    # without log_scale="pixel" nothing is grafted and the record is the file's
    kept = load_autoencoder(src)
    assert kept.config.likelihood == global_record()


def test_add_log_scale_head_on_a_calibrated_global_model():
    model = model_with(global_record())
    assert model.calibration is not None
    with pytest.warns(CalibrationDropped):
        model.add_log_scale_head(init=-1.5)
    assert_pixel_record(model, -1.5)


def test_an_optimal_fit_record_becomes_a_learned_pixel_one(tmp_path):
    src = saved(tmp_path, global_record(fit="optimal"))
    with pytest.warns(CalibrationDropped):
        assert_pixel_record(load_autoencoder(src, log_scale="pixel"), 0.0)


def test_uncalibrated_or_unrecorded_models_graft_without_a_note(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationDropped)
        assert_pixel_record(load_autoencoder(saved(tmp_path, global_record(calibrated=False)), log_scale="pixel"), 0.0)
        foreign = load_autoencoder(saved(tmp_path, None, "foreign"), log_scale="pixel")
    assert foreign.config.likelihood is None and model_nll(foreign).granularity == "pixel"


def test_a_pixel_record_whose_head_is_missing_loses_its_calibration_when_a_fresh_head_is_grafted(tmp_path):
    """An ldm export whose head file went missing: the calibration was fitted for that head."""
    record = Likelihood(granularity="pixel", family="gaussian", bounds=(-6.0, 2.0), margin=0.5,
                        calibration=dict(CALIBRATION))
    with pytest.warns(CalibrationDropped):
        assert_pixel_record(load_autoencoder(saved(tmp_path, record), log_scale="pixel"), 0.0)


def test_attach_reads_the_grafted_record(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    import hetvae

    src = saved(tmp_path, global_record())
    with pytest.warns(CalibrationDropped):
        assert main(["convert", str(src), "--to", "diffusers", "--set", "log_scale.granularity=pixel", "--out", str(tmp_path / "out")]) == 0
    vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "out").eval()
    dec = hetvae.attach_log_scale_head(vae, tmp_path / "out")
    assert dec.calibration is None and dec.likelihood.granularity == "pixel"
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        s = dec.decode(z).log_scale
    torch.testing.assert_close(s, torch.zeros_like(s))


def test_a_file_with_a_head_beside_a_global_record_is_scored_with_the_head(tmp_path):
    """What an older convert --log-scale pixel wrote: a head, and the global record with its
    calibration. model_nll scores the head's map (per-pixel, family and bounds kept), the dropped
    calibration announced; before, the head was ignored and the global scale scored."""
    model = model_with(None)
    model.add_log_scale_head()
    model.config.likelihood = global_record()  # as the older file recorded it
    with pytest.warns(CalibrationDropped):
        nll = model_nll(model)
    assert nll.granularity == "pixel" and nll.family == "gaussian"


def test_attach_a_head_file_beside_a_calibrated_global_config(tmp_path):
    """attach_log_scale_head with a head file alone falls back to the stock VAE's config: a
    calibrated global record there is not applied to the head's map."""
    diffusers = pytest.importorskip("diffusers")
    from hetvae.attach import attach_log_scale_head
    from hetvae.convert import DIFFUSERS_LIKELIHOOD_KEY

    src = model_with(None)
    src.add_log_scale_head()
    src.save_pretrained(tmp_path / "export", format="diffusers")
    head_file = next((tmp_path / "export").glob("*log_scale*"))
    vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "export")
    vae.register_to_config(**{DIFFUSERS_LIKELIHOOD_KEY: global_record().__dict__ | {"bounds": [-6.0, 2.0]}})
    lone = tmp_path / "lone" / head_file.name
    lone.parent.mkdir()
    lone.write_bytes(head_file.read_bytes())
    with pytest.warns(CalibrationDropped):
        decoder = attach_log_scale_head(vae, lone)
    assert decoder.likelihood.granularity == "pixel" and decoder.likelihood.calibration is None
