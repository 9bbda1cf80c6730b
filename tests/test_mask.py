"""Masks: a fixed-image mask weights the data term (the v-step stays closed form)."""

import json

import pytest
import torch

import nadmm_torch as nt
from nadmm_torch.data.sample import load_sample

RAW = dict(normalize="none", lam_scaling="none")  # scalings that look at the whole images


def _slice():
    s = load_sample()
    return s.fixed[:, :, 3], s.moving[:, :, 3]


@pytest.mark.parametrize("data_term", ["l2", "l1"])
def test_content_outside_the_mask_does_not_move_the_field(data_term):
    f, m = _slice()
    mask = torch.zeros_like(f, dtype=torch.bool)
    mask[..., :64] = True
    g = torch.Generator().manual_seed(0)
    f2, m2 = f.clone(), m.clone()
    f2[..., 96:] = torch.rand(f2[..., 96:].shape, generator=g)  # 32 voxels beyond the mask
    m2[..., 96:] = torch.rand(m2[..., 96:].shape, generator=g)
    kw = dict(spacing=(1.5, 1.5), data_term=data_term, **RAW)
    d1 = nt.register(f, m, mask=mask, **kw)
    d2 = nt.register(f2, m2, mask=mask, **kw)
    # Without the mask the new content drives the field; with it, only the regulariser
    # carries the field there, from the same masked data: the same field.
    assert float((nt.register(f, m, **kw) - nt.register(f2, m2, **kw)).abs().max()) > 1.0
    torch.testing.assert_close(d1, d2, rtol=0, atol=1e-6)
    assert float(nt.fold_percent(d1)[0]) == 0.0


def test_a_mask_of_ones_is_no_mask_and_weights_scale_the_data_term():
    f, m = _slice()
    ones = torch.ones_like(f)
    torch.testing.assert_close(nt.register(f, m, mask=ones), nt.register(f, m), rtol=0, atol=0)
    # l2: a constant weight w on the data term is λ·w (with the same θ).
    kw = dict(spacing=(1.5, 1.5), theta=0.01, **RAW)
    a = nt.register(f, m, mask=torch.full_like(f, 4.0), lam=0.3, **kw)
    b = nt.register(f, m, lam=1.2, **kw)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad, error, match", [
    (torch.ones(1, 1, 5, 5), ValueError, "^mask: expected shape"),
    (torch.ones(1, 1, 128, 128, dtype=torch.int64), TypeError, "^mask: expected a bool"),
    (-torch.ones(1, 1, 128, 128), ValueError, "^mask: expected weights >= 0"),
    (torch.full((1, 1, 128, 128), float("nan")), ValueError, "^mask: contains non-finite"),
    ([[1.0]], TypeError, "^mask: expected a torch.Tensor"),
])
def test_bad_masks_are_refused(bad, error, match):
    f, m = _slice()
    with pytest.raises(error, match=match):
        nt.register(f, m, mask=bad)


def test_cli_fixed_mask(tmp_path):
    import SimpleITK as sitk

    from nadmm_torch.cli import main
    from nadmm_torch.io import Geometry, write_image

    f, m = _slice()
    geo = Geometry.default((128, 128), (1.5, 1.5))
    mask = torch.zeros(1, 1, 128, 128, dtype=torch.uint8)
    mask[..., 32:96, 32:96] = 1
    for name, t in (("f", f), ("m", m), ("mask", mask)):
        write_image(t, geo, tmp_path / f"{name}.nii.gz")
    args = [str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "-q"]
    assert main([*args, "-o", str(tmp_path / "a"), "--fixed-mask",
                 str(tmp_path / "mask.nii.gz")]) == 0
    assert main([*args, "-o", str(tmp_path / "b")]) == 0
    key = json.loads((tmp_path / "a" / "summary.json").read_text())["resume_key"]
    assert key["fixed_mask"]["path"].endswith("mask.nii.gz")
    da = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a" / "displacement.nii.gz")))
    db = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "b" / "displacement.nii.gz")))
    assert abs(da - db).max() > 1e-3  # the mask changed the result


def test_per_sample_spacing_equals_one_by_one():
    s = load_sample()
    f = torch.cat([s.fixed[:, :, 2], s.fixed[:, :, 4]])
    m = torch.cat([s.moving[:, :, 2], s.moving[:, :, 4]])
    spacing = torch.tensor([[1.5, 1.5], [1.0, 2.0]])
    d = nt.register(f, m, spacing=spacing)
    for i in range(2):
        torch.testing.assert_close(d[i:i + 1], nt.register(f[i:i + 1], m[i:i + 1],
                                                           spacing=tuple(spacing[i].tolist())))
    torch.testing.assert_close(nt.register(f, m, spacing=[[1.5, 1.5]]),
                               nt.register(f, m, spacing=(1.5, 1.5)))
    with pytest.raises(ValueError, match="^spacing: expected 2 numbers or one row per batch"):
        nt.register(f, m, spacing=torch.ones(3, 2))
