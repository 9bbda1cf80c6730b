"""Metrics: Dice, slice-wise Hausdorff distance, folding percentage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nadmm_torch.metrics import dice, fold_percent, hausdorff_slices, jacobian_determinant


def test_dice_known_masks():
    pred = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    true = torch.zeros_like(pred)
    pred[0, 0, 0, :4] = 1  # 4 voxels of label 1
    true[0, 0, 0, :2] = 1  # 2 voxels, both inside pred
    pred[0, 0, 3, 3] = 2  # label 2 only in pred
    # label 3 in neither
    d = dice(pred, true, labels=(1, 2, 3))
    assert d.shape == (1, 3)
    assert d[0, 0].item() == pytest.approx(2 * 2 / 6)
    assert d[0, 1].item() == 0.0
    assert math.isnan(d[0, 2].item())


def test_dice_identical_and_batch():
    g = torch.Generator().manual_seed(0)
    lab = torch.randint(0, 4, (3, 1, 5, 6, 7), generator=g)
    d = dice(lab, lab)
    assert d.shape == (3, 3)
    assert torch.allclose(d, torch.ones_like(d))
    # channel-less layout works the same
    assert torch.equal(dice(lab[:, 0], lab[:, 0]), d)


def test_dice_validation():
    a = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="true_labels: expected the same shape"):
        dice(a, torch.zeros(1, 1, 4, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="pred_labels: expected an integer label map"):
        dice(a.float(), a)
    with pytest.raises(TypeError, match="true_labels: expected a torch.Tensor"):
        dice(a, a.numpy())
    with pytest.raises(ValueError, match="labels: expected at least one value"):
        dice(a, a, labels=())
    with pytest.raises(TypeError, match="labels: expected a sequence of integers"):
        dice(a, a, labels=(1.5,))
    with pytest.raises(ValueError, match="pred_labels: is empty"):
        dice(a[:0], a[:0])


def _brute_hd(a: np.ndarray, b: np.ndarray, sp: tuple[float, float]) -> float:
    pa = np.argwhere(a) * np.asarray(sp)
    pb = np.argwhere(b) * np.asarray(sp)
    dist = np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1))
    return max(dist.min(1).max(), dist.min(0).max())


def test_hausdorff_slices_matches_brute_force():
    rng = np.random.default_rng(1)
    shape = (2, 1, 4, 9, 11)
    pred = rng.integers(0, 4, shape)
    true = rng.integers(0, 4, shape)
    # sparse masks so that distances are non-trivial; one slice without label 2 in pred
    pred[rng.random(shape) < 0.6] = 0
    true[rng.random(shape) < 0.6] = 0
    pred[0, 0, 1][pred[0, 0, 1] == 2] = 0
    spacing = (10.0, 1.3, 0.7)  # full spacing: only the last two are used
    labels = (1, 2, 3)
    per_slice = hausdorff_slices(
        torch.from_numpy(pred), torch.from_numpy(true), spacing, labels, reduction="none"
    )
    mean = hausdorff_slices(torch.from_numpy(pred), torch.from_numpy(true), spacing, labels)
    assert per_slice.shape == (2, 3, 4)
    assert mean.shape == (2, 3)
    for i in range(2):
        for j, lab in enumerate(labels):
            vals = []
            for z in range(4):
                a, b = pred[i, 0, z] == lab, true[i, 0, z] == lab
                if a.any() and b.any():
                    ref = _brute_hd(a, b, (1.3, 0.7))
                    vals.append(ref)
                    assert per_slice[i, j, z].item() == pytest.approx(ref, rel=1e-9)
                else:
                    assert math.isnan(per_slice[i, j, z].item())
            assert mean[i, j].item() == pytest.approx(np.mean(vals), rel=1e-9)
    assert math.isnan(per_slice[0, 1, 1].item())


def test_hausdorff_slices_known_and_empty():
    pred = torch.zeros(1, 1, 2, 8, 8, dtype=torch.long)
    true = torch.zeros_like(pred)
    pred[0, 0, 0, 2, 2] = 1
    true[0, 0, 0, 5, 6] = 1  # 3 rows (sy = 2) and 4 columns (sx = 1) away
    hd = hausdorff_slices(pred, true, (2.0, 1.0), labels=(1, 2))
    assert hd[0, 0].item() == pytest.approx(math.hypot(6.0, 4.0))
    assert math.isnan(hd[0, 1].item())  # label 2 nowhere: NaN
    # a mask contained in the other: directed distance 0 one way, the extent the other way
    pred2 = torch.zeros(1, 1, 5, 5, dtype=torch.long)
    true2 = torch.zeros_like(pred2)
    true2[0, 0, 1:4, 1:4] = 1
    pred2[0, 0, 2, 2] = 1
    assert hausdorff_slices(pred2, true2, (1.0, 1.0), (1,))[0, 0].item() == pytest.approx(
        math.sqrt(2.0)
    )


def test_hausdorff_validation():
    a = torch.zeros(1, 1, 2, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="spacing"):
        hausdorff_slices(a, a, (1.0,))
    with pytest.raises(ValueError, match="spacing"):
        hausdorff_slices(a, a, (1.0, -1.0))
    with pytest.raises(ValueError, match="reduction: expected one of"):
        hausdorff_slices(a, a, (1.0, 1.0), reduction="sum")
    with pytest.raises(ValueError, match="pred: expected at least 3 dims"):
        hausdorff_slices(a[:, 0, 0, 0], a[:, 0, 0, 0], (1.0, 1.0))
    # the full spacing of S and a tensor work as the in-plane pair does
    two = torch.zeros(1, 1, 2, 4, 4, dtype=torch.long)
    two[0, 0, 0, 1, 1] = two[0, 0, 0, 2, 3] = 1
    ref = hausdorff_slices(two, two.flip(-1), (2.0, 1.0), (1,))
    assert ref.item() == pytest.approx(math.hypot(2.0, 1.0))  # (1,1)->(1,2) and (2,3)->(2,0)
    assert torch.equal(hausdorff_slices(two, two.flip(-1), (7.0, 2.0, 1.0), (1,)), ref)
    assert torch.equal(hausdorff_slices(two, two.flip(-1), torch.tensor([2.0, 1.0]), (1,)), ref)


def test_fold_percent_zero_and_known_fold():
    assert torch.equal(fold_percent(torch.zeros(2, 3, 4, 6, 8)), torch.zeros(2))
    assert fold_percent(torch.zeros(1, 2, 5, 5)).item() == 0.0
    # d_W = -1.5 x on the first half of the rows: det = 1 - 1.5 < 0 at the 8 interior columns
    # there; the two border columns use half-differences (det = 1 - 0.75 > 0); det = 1 on the
    # other rows. Folding: 1/2 * 8/10 = 40 %.
    d = torch.zeros(1, 3, 2, 8, 10, dtype=torch.float64)
    x = torch.arange(10, dtype=torch.float64)
    d[0, 2, :, :4, :] = -1.5 * x
    assert fold_percent(d).item() == pytest.approx(40.0)
    det = jacobian_determinant(d)
    assert det.shape == (1, 2, 8, 10)
    assert torch.all(det[0, :, :4, 1:-1] < 0) and torch.all(det[0, :, :4, [0, -1]] > 0)
    # a uniform flip folds everywhere (det = 1 - 2 < 0 inside, 1 - 1 = 0 at the borders)
    flip = torch.zeros(1, 2, 6, 6, dtype=torch.float64)
    flip[0, 1] = -2.0 * torch.arange(6, dtype=torch.float64)
    assert fold_percent(flip).item() == pytest.approx(100.0)


def test_fold_percent_validation():
    with pytest.raises(ValueError, match="displacement: expected a \\(B, ndim, \\*S\\)"):
        fold_percent(torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(TypeError, match="displacement: expected a floating dtype"):
        fold_percent(torch.zeros(1, 3, 4, 4, 4, dtype=torch.long))
    nan = torch.zeros(1, 2, 4, 4)
    nan[0, 0, 1, 1] = math.nan  # NaN compares False with 0: it would count as fold-free
    with pytest.raises(ValueError, match="displacement: contains non-finite values"):
        fold_percent(nan)
    with pytest.raises(ValueError, match="displacement"):
        jacobian_determinant(nan)


def test_metrics_on_every_device_and_dtype(device, dtype):
    """The public metrics keep the input's device; fold % and det J agree with the internal
    operator they check and call."""
    from nadmm_torch.ops.diff import jacobian_determinant as unchecked

    g = torch.Generator().manual_seed(0)
    d = (torch.randn(2, 2, 9, 7, generator=g, dtype=torch.float64) * 0.8).to(device, dtype)
    det = jacobian_determinant(d)
    assert det.device == d.device and det.dtype == dtype
    assert torch.equal(det, unchecked(d))
    expected = (unchecked(d) <= 0).flatten(1).to(dtype).mean(1) * 100
    assert torch.equal(fold_percent(d), expected)
    lab = torch.randint(0, 3, (2, 1, 9, 7), generator=g).to(device)
    assert dice(lab, lab, (1, 2)).device == d.device
