"""benchmarks/coupling_order.py: its fit recovers the coefficients and scales of data drawn from a
known coupled likelihood, the true order scores best, and on a tiny model the script writes the six
orders beside no coupling, scored as ``hetvae eval`` scores."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def order_bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("coupling_order")


def quantize(x: torch.Tensor) -> torch.Tensor:
    return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def draw(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` pixels drawn B first, then G given B, then R given B and G, each channel's 8-bit value
    the rounded Laplace draw around ``mu + sum a (x_earlier - mu_earlier)``; the model's log-scale is
    log 0.04 everywhere, so the offsets to find are log(b / 0.04)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(1, 3, n, generator=g, dtype=torch.float64) * 1.2 - 0.6
    u = torch.rand(1, 3, n, generator=g, dtype=torch.float64) - 0.5
    e = -SCALES.view(1, 3, 1) * u.sign() * torch.log1p(-2 * u.abs())  # Laplace(0, b) by inversion
    x = torch.empty_like(mu)
    x[:, 2] = quantize(mu[:, 2] + e[:, 2])
    x[:, 1] = quantize(mu[:, 1] + A_GB * (x[:, 2] - mu[:, 2]) + e[:, 1])
    x[:, 0] = quantize(mu[:, 0] + A_RB * (x[:, 2] - mu[:, 2]) + A_RG * (x[:, 1] - mu[:, 1]) + e[:, 0])
    return x, mu, torch.full_like(mu, math.log(0.04))


SCALES = torch.tensor([0.03, 0.05, 0.02], dtype=torch.float64)  # R, G, B: 4, 6 and 2.5 levels
A_GB, A_RB, A_RG = 0.7, 0.4, -0.3


def test_fit_recovers_a_known_coupling_and_the_true_order_scores_best(order_bench):
    fit_data, eval_data = draw(40000, seed=0), draw(40000, seed=1)
    fits = {order: order_bench.fit_likelihood(fit_data, order, "laplace") for order in order_bench.ORDERS}
    true = fits[(2, 1, 0)]
    assert order_bench.coefficient_names((2, 1, 0)) == ["a_GB", "a_RB", "a_RG"]
    torch.testing.assert_close(true.coefficients, torch.tensor([A_GB, A_RB, A_RG], dtype=torch.float64),
                               rtol=0, atol=0.02)
    torch.testing.assert_close(true.offsets, torch.log(SCALES / 0.04), rtol=0, atol=0.03)
    assert all(f.grad_norm < 1e-7 for f in fits.values())
    none = order_bench.fit_likelihood(fit_data, None, "laplace")
    assert none.coefficients.numel() == 0 and none.grad_norm < 1e-7
    # the first channel of an order is scored alone: its offset is the uncoupled fit's
    assert fits[(2, 0, 1)].offsets[2].item() == pytest.approx(none.offsets[2].item(), abs=1e-5)
    scores = {order: order_bench.score([eval_data], f, "laplace") for order, f in fits.items()}
    best = min(scores, key=scores.get)
    assert best == (2, 1, 0), scores
    runner_up = sorted(scores.values())[1]
    assert runner_up - scores[best] > 0.005, scores  # measured 0.018 (G -> B -> R)
    assert order_bench.score([eval_data], none, "laplace") - scores[best] > 0.08  # measured 0.11


def test_script_writes_the_six_orders_scored_as_eval_scores(order_bench, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from hetvae import AutoencoderConfig, AutoencoderKL
    from hetvae.evaluate import evaluate
    from hetvae.images import load_images
    from hetvae.predictor import load_predictor

    rng = np.random.default_rng(0)
    (tmp_path / "a").mkdir()
    for k in range(2):  # smooth colour ramps with correlated noise: something for the coupling to find
        base = np.linspace(40, 200, 32)[None, :, None] + rng.normal(0, 12, (32, 32, 1))
        image = base + rng.normal(0, 4, (32, 32, 3)) + np.array([0, 10, -10])
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(tmp_path / "a" / f"{k}.png")
    torch.manual_seed(0)
    model = AutoencoderKL(AutoencoderConfig(block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1,
                                            latent_channels=4, log_scale="pixel"))
    model.save_pretrained(tmp_path / "m")
    out = tmp_path / "order.json"
    assert order_bench.main([str(tmp_path / "m"), "--photos", str(tmp_path / "a"), "--fit", str(tmp_path / "a"),
                             "--fit-pixels", "0", "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["order"] for r in rows] == ["none", "RGB", "RBG", "GRB", "GBR", "BRG", "BGR"]
    assert all(r["converged"] for r in rows)
    assert list(rows[2]["coefficients"]) == ["a_BR", "a_GR", "a_GB"]  # R -> B -> G
    # fitted and scored on the same photographs: each fit can only lower the bits it was fitted on
    for r in rows[1:]:
        assert r["nll_bpd"] == pytest.approx(r["fit_nll_bpd"], abs=1e-9)
        assert r["minus_none"] < 1e-9
    table = capsys.readouterr().out
    assert all(f"| {r['order']} | {r['nll_bpd']:.4f} |" in table for r in rows)
    # the scoring is hetvae eval's: zero offsets and no coupling give the model's own bits/dim
    predictor = load_predictor(tmp_path / "m", calibrated=False)
    images = order_bench.reconstruct(predictor, order_bench.list_images(tmp_path / "a"))
    zero = order_bench.Fit(None, torch.zeros(0), torch.zeros(3, dtype=torch.float64), 0.0, 0.0, 0)
    want = evaluate(predictor, load_images(tmp_path / "a"))["nll_bpd"]
    assert order_bench.score(images, zero, "laplace") == pytest.approx(want, rel=1e-12)


def test_script_refuses_an_empty_scored_set(order_bench, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        order_bench.main(["unused", "--photos", str(order_bench.calibration_photos()[0]), "--exclude-shipped"])
    assert exit_.value.code == 2
    assert "no photographs to score" in capsys.readouterr().err
