"""The chroma term of a post-hoc calibration: ``g1 * u + g2 * u^2`` on the log-scale, ``u`` the log
chroma of the model's reconstruction. The feature against hand-computed values, no term = the
calibration as it was, a synthetic fit that must recover known coefficients, the refusals, and the
pair kept by model files and applied by decode, eval and ``hetvae calibrate --chroma``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_calibrate_cli import photos, pixel_run  # noqa: F401  (module fixtures: a tiny run, photos)

import hetvae.calibration as C
from hetvae.calibration import (
    Calibration,
    CalibrationError,
    calibrated_metrics,
    fit_calibration,
    log_chroma_magnitude,
    pooled,
    pooled_reconstruction,
)
from hetvae.functional import discretized_nll, soft_clamp


def test_the_chroma_feature_is_the_log_of_the_mean_distance_from_the_luma():
    image = torch.tensor([[0.5, 0.3], [-0.2, 0.3], [0.1, 0.3]], dtype=torch.float64).view(1, 3, 1, 2)
    luma = 0.299 * 0.5 + 0.587 * -0.2 + 0.114 * 0.1  # 0.0435
    want = math.log((abs(0.5 - luma) + abs(-0.2 - luma) + abs(0.1 - luma)) / 3 + 0.01)
    got = log_chroma_magnitude(image)
    assert got.shape == (1, 1, 1, 2)
    assert got[0, 0, 0, 0].item() == pytest.approx(want, abs=1e-12)
    assert got[0, 0, 0, 1].item() == pytest.approx(math.log(0.01), abs=1e-12)  # a grey pixel: the floor
    with pytest.raises(CalibrationError, match=r"RGB reconstruction \(B, 3, H, W\), got \(1, 1, 4, 4\)"):
        log_chroma_magnitude(torch.zeros(1, 1, 4, 4))


def _images(seed: int = 0, n: int = 40_000):
    """Pooled colour means ``(1, 3, N, 1)`` with every level of chroma, and a base log-scale map."""
    g = torch.Generator().manual_seed(seed)
    grey = (torch.rand(1, 1, n, 1, generator=g, dtype=torch.float64) - 0.5) * 0.6
    colour = torch.randn(1, 3, n, 1, generator=g, dtype=torch.float64)
    colour = colour / colour.norm(dim=1, keepdim=True)
    amount = torch.exp(math.log(0.002) + math.log(150) * torch.rand(1, 1, n, 1, generator=g, dtype=torch.float64))
    mean = grey + amount * colour  # log chroma spread evenly from near the floor to strong colour
    base = -3.2 + 0.6 * torch.rand(1, 1, n, 1, generator=g, dtype=torch.float64)
    return g, mean, base


def test_without_a_chroma_term_nothing_changes_and_the_mean_is_not_read():
    _, mean, base = _images(n=500)
    s = base.expand(1, 3, -1, -1)
    target = (mean + 0.05 * torch.randn_like(mean)).clamp(-1, 1)
    slope, offset = torch.tensor([1.1, 0.9, 1.0]), torch.tensor([0.2, -0.1, 0.3])
    cal = Calibration("affine", "laplace", slope, offset)
    want = slope.double().view(3, 1, 1) * s + offset.double().view(3, 1, 1)
    assert torch.equal(cal.apply(s), want) and torch.equal(cal.apply(s, torch.full_like(mean, 7.0)), want)
    assert cal.bits_per_dim(target, mean, s) == pytest.approx(
        discretized_nll(target, mean, want, "laplace").mean().item() / math.log(2), rel=1e-12)
    assert "chroma" not in cal.to_dict() and cal.chroma is None
    knots = torch.linspace(0, 1, 11, dtype=torch.float64).pow(1.5).expand(3, -1)
    iso = Calibration("isotonic", "laplace", slope, offset, knots=knots)
    assert torch.equal(iso.apply(s), want + iso.interval_factor(0.9).log().view(3, 1, 1))


def _synthetic(g1: float, g2: float, c0: float, seed: int = 0):
    """Laplace targets whose log-scale is ``base + c0 + g1 u + g2 u^2`` around colour means."""
    _, mean, base = _images(seed)
    u = log_chroma_magnitude(mean)
    true = base + c0 + g1 * u + g2 * u * u
    noise = torch.distributions.Laplace(0.0, 1.0).sample(mean.shape).double()
    target = (mean + true.exp() * noise).clamp(-1, 1)
    return target, mean, base


def test_the_fit_recovers_the_chroma_coefficients():
    torch.manual_seed(0)
    target, mean, base = _synthetic(g1=1.0, g2=0.15, c0=1.5)  # about what photographs gave
    cal = fit_calibration(target, mean, base, "laplace", "affine", chroma=True, chroma_of=mean, slope=True)
    g1, g2 = cal.chroma.tolist()
    assert g1 == pytest.approx(1.0, abs=0.1) and g2 == pytest.approx(0.15, abs=0.015)
    torch.testing.assert_close(cal.slope, torch.ones(3, dtype=torch.float64), atol=0.06, rtol=0)
    torch.testing.assert_close(cal.offset, torch.full((3,), 1.5, dtype=torch.float64), atol=0.2, rtol=0)
    plain = fit_calibration(target, mean, base, "laplace", "affine", slope=True)
    assert cal.bpd_after < plain.bpd_after - 0.003  # the term explains what one offset cannot
    # the stored pair is applied as fitted: the metrics recomputed from the record agree
    again = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    torch.testing.assert_close(again.chroma, cal.chroma, rtol=0, atol=0)
    assert calibrated_metrics(target, mean, base, again, chroma_of=mean)["nll_bpd"] == pytest.approx(cal.bpd_after, rel=1e-9)


def test_a_chroma_term_that_makes_the_fit_worse_is_refused(monkeypatch):
    torch.manual_seed(1)
    target, mean, base = _synthetic(g1=0.0, g2=0.0, c0=0.2, seed=1)
    fit = C._fit_affine

    def spoiled(x, mu, s, family, constant, u=None):
        a, c, g = fit(x, mu, s, family, constant, u)
        return a, c, None if g is None else g + torch.tensor([0.0, 0.3], dtype=torch.float64)

    monkeypatch.setattr(C, "_fit_affine", spoiled)
    with pytest.raises(CalibrationError, match="chroma term makes bits/dim on the fitting images worse"):
        fit_calibration(target, mean, base, "laplace", "isotonic", chroma=True, chroma_of=mean)


def test_what_a_chroma_term_cannot_do_without_is_refused():
    torch.manual_seed(2)
    target, mean, base = _synthetic(g1=0.3, g2=0.0, c0=0.0, seed=2)
    with pytest.raises(CalibrationError, match="chroma=True needs chroma_of="):
        fit_calibration(target, mean, base, "laplace", "affine", chroma=True)
    grey = mean.mean(dim=1, keepdim=True).expand_as(mean).contiguous()
    with pytest.raises(CalibrationError, match="the same at every fitting pixel"):
        fit_calibration(target, mean, base, "laplace", "affine", chroma=True, chroma_of=grey)
    one = target[:, :1]
    with pytest.raises(CalibrationError, match="3 \\(RGB\\) channels"):
        fit_calibration(one, mean[:, :1], base, "laplace", "affine", chroma=True, chroma_of=mean[:, :1])
    with pytest.raises(CalibrationError, match="needs 3 \\(RGB\\) channels, this calibration has 1"):
        Calibration("affine", "laplace", [1.0], [0.0], chroma=[0.1, 0.2])
    cal = Calibration("affine", "laplace", torch.ones(3), torch.zeros(3), chroma=[0.1, 0.2])
    with pytest.raises(CalibrationError, match="pass the model's reconstruction as mean="):
        cal.apply(base)
    with pytest.raises(CalibrationError, match="mean="):
        cal.bits_per_dim(target, mean, base)  # mean there is the centre: chroma_of= is required
    with pytest.raises(CalibrationError, match="chroma must be 2 finite numbers"):
        Calibration("affine", "laplace", torch.ones(3), torch.zeros(3), chroma=[0.1])


def test_the_term_is_applied_with_the_mean_and_a_coupled_centre_is_not_its_source():
    _, mean, base = _images(n=300)
    cal = Calibration("affine", "laplace", torch.ones(3), torch.full((3,), 0.2), chroma=[0.4, 0.05])
    u = log_chroma_magnitude(mean)
    torch.testing.assert_close(cal.apply(base, mean), (base + 0.2 + 0.4 * u + 0.05 * u * u).expand(1, 3, -1, -1))
    target = (mean + 0.05 * torch.randn(mean.shape, generator=torch.Generator().manual_seed(3), dtype=mean.dtype)).clamp(-1, 1)
    centre = target.clone()  # a centre that knows the true values: its chroma is not the model's
    a = cal.bits_per_dim(target, centre, base, chroma_of=mean)
    s = (base + 0.2 + 0.4 * u + 0.05 * u * u).expand(1, 3, -1, -1)
    assert a == pytest.approx(discretized_nll(target, centre, s, "laplace").mean().item() / math.log(2), rel=1e-8)
    assert cal.bits_per_dim(target, centre, base, chroma_of=centre) != pytest.approx(a, rel=1e-3)


def _tiny_model(calibration: dict):
    from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL

    torch.manual_seed(0)
    config = AutoencoderConfig(
        block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8, log_scale="pixel", log_scale_init=-2.0,
        likelihood={"granularity": "pixel", "family": "laplace", "init": -2.0, "calibration": calibration},
    )
    return AutoencoderKL(config).eval()


@pytest.mark.parametrize("fmt", ["hetvae", "diffusers"])
def test_model_files_keep_the_pair_and_decode_applies_it(fmt, tmp_path, capsys):
    from hetvae.cli import main
    from hetvae.convert import load_autoencoder

    cal = Calibration("affine", "laplace", torch.tensor([1.1, 1.0, 0.9]), torch.tensor([0.1, 0.2, 0.3]),
                      chroma=[0.6, 0.07])
    model = _tiny_model(cal.to_dict())
    model.save_pretrained(tmp_path / fmt, format=fmt)
    loaded = load_autoencoder(tmp_path / fmt).eval()
    torch.testing.assert_close(loaded.calibration.chroma, cal.chroma, rtol=0, atol=0)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        rec = loaded.decode(z)
        loaded.use_calibration = False
        raw = loaded.decode(z).log_scale
    lik = loaded.config.likelihood
    torch.testing.assert_close(rec.log_scale, cal.apply(soft_clamp(raw, *lik.bounds, lik.margin), rec.mean).float())
    assert main(["info", str(tmp_path / fmt)]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("calibration:")]
    assert len(line) == 1 and "chroma +0.6 u +0.07 u^2" in line[0]
    # a record without the pair reads as no chroma term
    plain = dict(cal.to_dict())
    del plain["chroma"]
    assert _tiny_model(plain).calibration.chroma is None


def test_calibrate_chroma_stores_the_pair_and_eval_uses_it(pixel_run, photos, tmp_path):  # noqa: F811
    import shutil

    from hetvae.cli import main
    from hetvae.images import load_images
    from hetvae.predictor import load_predictor, predict_all

    run = tmp_path / "run"
    shutil.copytree(pixel_run, run)
    assert main(["calibrate", str(run), "--images", str(photos), "--chroma"]) == 0
    cal = load_predictor(run).calibration
    assert cal is not None and cal.chroma is not None and cal.bpd_after <= cal.bpd_before
    assert main(["eval", str(run), "--images", str(photos), "--out", str(tmp_path / "m.json")]) == 0
    result = json.loads((tmp_path / "m.json").read_text())
    predictions = predict_all(load_predictor(run, calibrated=False), load_images(photos))
    target, centre, s = pooled(predictions)
    want = calibrated_metrics(target, centre, s, cal, chroma_of=pooled_reconstruction(predictions))
    assert result["nll_bpd"] == pytest.approx(want["nll_bpd"], rel=1e-5)
    assert result["coverage_90"] == pytest.approx(want["coverage_90"], abs=1e-6)
    without = Calibration(cal.method, cal.family, cal.slope, cal.offset, knots=cal.knots)
    assert calibrated_metrics(target, centre, s, without)["nll_bpd"] != pytest.approx(result["nll_bpd"], rel=1e-5)


def test_with_colour_coupling_the_term_reads_the_reconstruction_not_the_centre():
    from test_coupling_downstream import _images as coupled_images
    from test_coupling_downstream import _model as coupled_model

    from hetvae.predictor import Predictor, calibrate

    model, nll = coupled_model("pixel")
    predictor = Predictor(model=model, nll=nll, source="test")
    images = coupled_images(2)
    preds = [predictor.predict(x) for x in images]
    target, centre, s = pooled(preds)  # centre: the conditional centre, which knows the true values
    recon = torch.cat([p.mean.flatten(2) for p in preds], 2).unsqueeze(-1)
    assert not torch.equal(centre, recon)
    kwargs = {"method": "affine", "min_pixels": 1000, "slope": False, "chroma": True}
    cal = calibrate(predictor, images, **kwargs)
    want = fit_calibration(target, centre, s, "laplace", chroma_of=recon, **kwargs)
    torch.testing.assert_close(cal.chroma, want.chroma)
    wrong = fit_calibration(target, centre, s, "laplace", chroma_of=centre, **kwargs)
    assert not torch.allclose(cal.chroma, wrong.chroma, rtol=1e-3, atol=1e-4)
