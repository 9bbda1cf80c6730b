"""Intensity normalisation of a pair before solving (``normalize=``): the robust percentile map
(default), joint min–max and none; and that one hot voxel no longer changes the registration.

The ACDC test reads ``../shared/data/acdc`` and skips where it is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import nadmm_torch as nt
from nadmm_torch.data import load_sample
from nadmm_torch.data.acdc import evaluate_pair, load_pair, read_pairs, split
from nadmm_torch.ops import solver
from nadmm_torch.ops.solver import NORMALIZE_PERCENTILES, SolverConfig, normalise_pair

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data" / "acdc"


def _brute_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """Lower-rank quantile by a full sort (the definition the kthvalue path must match)."""
    s = x.flatten().sort().values
    return s[round(q * (s.numel() - 1))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_percentile_maps_the_joint_percentiles_to_0_and_1_and_clips(dtype):
    g = torch.Generator().manual_seed(0)
    f = torch.rand(2, 1, 9, 11, generator=g, dtype=dtype) * 500 + 20
    m = torch.rand(2, 1, 9, 11, generator=g, dtype=dtype) * 500 + 20
    nf, nm = normalise_pair(f, m, "percentile")
    lo_q, hi_q = (p / 100 for p in NORMALIZE_PERCENTILES)
    for b in range(2):
        both = torch.cat([f[b].flatten(), m[b].flatten()])
        lo, hi = _brute_quantile(both, lo_q), _brute_quantile(both, hi_q)
        expected = ((f[b] - lo) / (hi - lo)).clamp(0, 1)
        torch.testing.assert_close(nf[b], expected)
        torch.testing.assert_close(nm[b], ((m[b] - lo) / (hi - lo)).clamp(0, 1))
    assert float(nf.min()) == 0.0 and float(nm.max()) <= 1.0 and nf.dtype == dtype


def test_minmax_and_none_and_bool_aliases():
    f = torch.tensor([[[[0.0, 2.0], [4.0, 6.0]]]])
    m = torch.tensor([[[[1.0, 3.0], [8.0, 5.0]]]])
    nf, nm = normalise_pair(f, m, "minmax")
    torch.testing.assert_close(nf, f / 8)
    torch.testing.assert_close(nm, m / 8)
    assert normalise_pair(f, m, "none") == (f, m)
    assert SolverConfig(normalize=True).normalize == "percentile"
    assert SolverConfig(normalize=False).normalize == "none"
    assert SolverConfig().normalize == "percentile"


def test_batch_elements_are_normalised_independently():
    g = torch.Generator().manual_seed(1)
    f = torch.rand(3, 1, 6, 7, 8, generator=g)
    m = torch.rand(3, 1, 6, 7, 8, generator=g)
    f[1] *= 1000.0
    m[2, 0, 0, 0, 0] = 1e6  # an outlier in one element only
    nf, nm = normalise_pair(f, m)
    for b in range(3):
        ef, em = normalise_pair(f[b:b + 1], m[b:b + 1])
        torch.testing.assert_close(nf[b:b + 1], ef)
        torch.testing.assert_close(nm[b:b + 1], em)


def test_one_outlier_does_not_change_the_scale():
    g = torch.Generator().manual_seed(2)
    f = torch.rand(1, 1, 32, 32, generator=g)
    m = torch.rand(1, 1, 32, 32, generator=g)
    hot = m.clone()
    hot[0, 0, 5, 5] = 100 * float(m.max())
    nf, nm = normalise_pair(f, m)
    hf, hm = normalise_pair(f, hot)
    # One voxel of 2048 moves the 0.5/99.5 % ranks by at most one sample.
    assert float((nf - hf).abs().max()) < 0.01
    assert float(hm[0, 0, 5, 5]) == 1.0
    # min–max squeezes everything else into [0, 0.01]
    assert float(normalise_pair(f, hot, "minmax")[0].max()) < 0.011


def test_almost_constant_image_falls_back_to_minmax():
    # 99.8 % zeros: both percentiles are 0, so the scale comes from the min and max.
    f = torch.zeros(1, 1, 32, 32)
    m = torch.zeros(1, 1, 32, 32)
    f[0, 0, 3, 4] = 5.0
    m[0, 0, 7, 8] = 2.5
    nf, nm = normalise_pair(f, m)
    torch.testing.assert_close(nf, f / 5)
    torch.testing.assert_close(nm, m / 5)
    c = torch.full((1, 1, 8, 8), 3.0)  # constant: finite, no division by zero
    assert torch.isfinite(torch.stack(normalise_pair(c, c))).all()


def test_large_inputs_use_a_subsample(monkeypatch):
    monkeypatch.setattr(solver, "QUANTILE_SAMPLES", 1000)
    x = torch.arange(40_000, dtype=torch.float64).reshape(1, 1, 200, 200)
    nf, _ = normalise_pair(x, x.flip(-1))
    # Strided subsample of 0..39999: quantiles within one stride (40) of the exact ones.
    lo = 0.005 * 39_999
    hi = 0.995 * 39_999
    expected = ((x - lo) / (hi - lo)).clamp(0, 1)
    assert float((nf - expected).abs().max()) < 50 / (hi - lo)


def test_gradcheck_through_the_percentile_map():
    g = torch.Generator().manual_seed(3)
    f = torch.rand(2, 1, 5, 6, generator=g, dtype=torch.float64).requires_grad_()
    m = torch.rand(2, 1, 5, 6, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: normalise_pair(a, b), (f, m))


@pytest.mark.parametrize("bad", ["robust", 1, "True", [True]])
def test_bad_normalize_is_rejected_by_name(bad):
    f = torch.rand(1, 1, 16, 16)
    with pytest.raises(ValueError, match="normalize"):
        nt.register(f, f, normalize=bad)


def _hot(moving: torch.Tensor) -> torch.Tensor:
    """The moving image with one voxel at 100× the image maximum, inside the heart crop."""
    hot = moving.clone()
    hot[0, 0, moving.shape[2] // 2, 94, 94] = 100 * float(moving.max())
    return hot


@pytest.mark.parametrize("mode,changes", [("percentile", False), ("minmax", True)])
def test_hot_voxel_on_the_sample_pair(mode, changes):
    s = load_sample()
    scores = []
    for moving in (s.moving, _hot(s.moving)):
        d = nt.register(s.fixed, moving, spacing=s.spacing, normalize=mode)
        scores.append(evaluate_pair(s, d)["dice"])
    # The robust default ignores the voxel; min–max (the old default) does not, which is
    # what makes this test able to fail.
    assert (abs(scores[0] - scores[1]) >= 0.05) == changes, scores
    assert abs(scores[0] - scores[1]) < 0.005 or changes


@pytest.mark.skipif(not (DATA / "pairs.csv").is_file(), reason=f"ACDC data {DATA} is absent")
def test_hot_voxel_changes_acdc_dice_by_less_than_0_005():
    _, report = split(read_pairs(DATA))
    deltas = []
    for pid in report[::5]:  # 4 report pairs, one per 5
        pair = load_pair(DATA, pid)
        clean = evaluate_pair(pair, nt.register(pair.fixed, pair.moving, spacing=pair.spacing))
        hot = nt.register(pair.fixed, _hot(pair.moving), spacing=pair.spacing)
        deltas.append(evaluate_pair(pair, hot)["dice"] - clean["dice"])
    assert abs(sum(deltas) / len(deltas)) < 0.005, deltas
    assert max(abs(x) for x in deltas) < 0.01, deltas
