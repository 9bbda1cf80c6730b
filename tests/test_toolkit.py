"""The toolkit around the solver: TorchIO images in ``warp`` / ``warp_labels`` / ``dice``, the
CLI's outputs against SimpleITK's ``Resample``, ``--compile``'s notice, the figure's legend and
slice (``--plot-slice``), ``nadmm-tune -o``, and the console scripts' shared entry wrapper."""

from __future__ import annotations

import errno
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import nadmm_torch as nt
from nadmm_torch import _cli_common, cli, viz
from nadmm_torch.checks import one_line
from nadmm_torch.io import Geometry, from_torchio, read_image, read_labels, write_image
from tests.test_apply import (
    _array,
    _field_transform,
    _in_itk_buffer,
    _pair,
    _register,
    _sitk_resample,
    _write,
)
from tests.test_cli import _known_field
from tests.test_cli_tune_inverse import _write_pairs

tio = pytest.importorskip("torchio")


def _rotated_geometry(shape, spacing) -> Geometry:
    """A grid rotated 90 degrees in-plane (a flipped slice axis in 3D), non-zero origin."""
    if len(shape) == 2:
        direction, origin = np.array([[0.0, -1.0], [1.0, 0.0]]), (12.5, -40.0)
    else:
        direction = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
        origin = (12.5, -40.0, 7.0)
    return Geometry(size=tuple(reversed(shape)), spacing=tuple(reversed(spacing)),
                    origin=origin, direction=tuple(direction.ravel()))


def _sample_files(folder: Path) -> dict[str, Path]:
    """The whole bundled sample as NIfTI files on a rotated grid."""
    from nadmm_torch.data.sample import load_sample

    s = load_sample()
    geo = _rotated_geometry(s.fixed.shape[2:], s.spacing)
    paths = {}
    for key in ("fixed", "moving", "fixed_labels", "moving_labels"):
        paths[key] = folder / f"{key}.nii.gz"
        write_image(getattr(s, key), geo, paths[key])
    return paths


# -- TorchIO images in warp, warp_labels and dice ----------------------------------------------


def test_torchio_round_trip_gives_the_dice_of_the_tensor_path(tmp_path):
    """Files read by TorchIO, registered, warped and scored with TorchIO images give the same
    displacement, labels and Dice as the same files read as tensors; the warped
    ``tio.LabelMap`` keeps the input's affine and, saved, reads back as the tensor result."""
    paths = _sample_files(tmp_path)
    fixed, geo = read_image(paths["fixed"])
    moving, _ = read_image(paths["moving"])
    fixed_labels, _ = read_labels(paths["fixed_labels"])
    moving_labels, _ = read_labels(paths["moving_labels"])
    d = nt.register(fixed, moving, spacing=geo.array_spacing)
    warped_labels = nt.warp_labels(moving_labels, d)
    dice = nt.dice(warped_labels, fixed_labels)

    F, M = tio.ScalarImage(paths["fixed"]), tio.ScalarImage(paths["moving"])
    FL, ML = tio.LabelMap(paths["fixed_labels"]), tio.LabelMap(paths["moving_labels"])
    d_tio = nt.register(F, M)
    torch.testing.assert_close(d_tio, d, rtol=0, atol=1e-5)
    W = nt.warp_labels(ML, d_tio)
    assert isinstance(W, tio.LabelMap)
    np.testing.assert_allclose(W.affine, ML.affine)
    dice_tio = nt.dice(W, FL)
    torch.testing.assert_close(dice_tio, dice, rtol=0, atol=1e-12)
    assert float(dice.nanmean()) > float(nt.dice(moving_labels, fixed_labels).nanmean()) + 0.1
    torch.testing.assert_close(nt.dice(warped_labels, FL), dice)  # a tensor with a LabelMap
    W.save(tmp_path / "w.nii.gz")
    torch.testing.assert_close(read_labels(tmp_path / "w.nii.gz")[0], warped_labels)

    image = nt.warp(M, d_tio)
    assert isinstance(image, tio.ScalarImage)
    np.testing.assert_allclose(image.affine, M.affine)
    torch.testing.assert_close(from_torchio(image)[0], nt.warp(moving, d), rtol=0, atol=1e-5)


def test_torchio_2d_images_keep_their_layout():
    f, m, fl, ml, _ = _pair()
    geo = Geometry.default((64, 64), (1.5, 1.5))
    M = nt.io.to_torchio(m[:, :, 3], geo)
    ML = nt.io.to_torchio(ml[:, :, 3], geo, label=True)
    assert M.shape == (1, 64, 64, 1)  # TorchIO's 2D: (C, W, H, 1)
    d = _known_field(f[:, :, 3], m[:, :, 3])
    W, WL = nt.warp(M, d), nt.warp_labels(ML, d)
    assert W.shape == M.shape and WL.shape == ML.shape
    torch.testing.assert_close(from_torchio(W)[0], nt.warp(m[:, :, 3], d))
    torch.testing.assert_close(from_torchio(WL)[0], nt.warp_labels(ml[:, :, 3], d))
    nearest = nt.warp(ML, d, mode="nearest")
    assert isinstance(nearest, tio.LabelMap)


def test_torchio_inputs_that_do_not_fit_are_named():
    _, m, _, ml, _ = _pair()
    geo = Geometry.default(tuple(m.shape[2:]), (10.0, 1.5, 1.5))
    M, ML = nt.io.to_torchio(m, geo), nt.io.to_torchio(ml, geo, label=True)
    d = torch.zeros(1, 3, *m.shape[2:])
    with pytest.raises(TypeError, match=r"labels: .*tio.LabelMap, got a ScalarImage"):
        nt.warp_labels(M, d)
    with pytest.raises(TypeError, match=r"true_labels: .*tio.LabelMap, got a ScalarImage"):
        nt.dice(ML, M)
    with pytest.raises(TypeError, match=r"pred_labels: expected a tensor or a tio.LabelMap"):
        nt.dice(tio.Subject(labels=ML), ML)
    with pytest.raises(TypeError, match="nearest"):
        nt.warp(ML, d)  # a label map needs mode="nearest" (or warp_labels)
    with pytest.raises(ValueError, match="displacement: shape"):
        nt.warp(M, torch.zeros(1, 3, 4, 64, 64))


# -- the CLI's outputs = SimpleITK's Resample -------------------------------------------------


def test_2d_cli_outputs_equal_simpleitk_resample(tmp_path, capsys):
    """2D files: warped.nii.gz = ``sitk.Resample`` (linear, nearest-neighbour extrapolator)
    where the sampling point is within half a voxel of the grid; warped_labels.nii.gz =
    ``sitkLabelLinear`` at every voxel."""
    f, m, _, ml, spacing = _pair()
    geo = _rotated_geometry((64, 64), spacing[1:])
    paths = {k: tmp_path / f"{k}.nii.gz" for k in ("fixed", "moving", "moving_labels")}
    for key, t in (("fixed", f), ("moving", m), ("moving_labels", ml)):
        write_image(t[:, :, 3].contiguous(), geo, paths[key])
    out = tmp_path / "out"
    _register(paths, out, capsys)
    transform = _field_transform(out / "displacement.nii.gz")
    d, _ = nt.io.read_displacement(out / "displacement.nii.gz")
    inside = _in_itk_buffer(d)
    assert d.shape == (1, 2, 64, 64) and inside.mean() > 0.85
    theirs = _sitk_resample(paths["moving"], paths["fixed"], transform)
    np.testing.assert_allclose(_array(out / "warped.nii.gz")[inside], theirs[inside], rtol=0,
                               atol=1e-5)
    labels = _array(out / "warped_labels.nii.gz")
    assert (labels != _array(paths["moving_labels"])).mean() > 0.01  # the labels did move
    np.testing.assert_array_equal(labels, _sitk_resample(paths["moving_labels"],
                                                         paths["fixed"], transform, labels=True))


def test_cli_outputs_of_a_moving_image_on_another_grid_equal_two_resamples(tmp_path, capsys):
    """A moving image on another grid is first resampled into the fixed grid (linear, 0
    outside its extent; labels nearest neighbour): the outputs equal that resampling followed
    by ``sitk.Resample`` with the field, and differ from one ``Resample`` of the original."""
    paths = _write(tmp_path, "cropped")
    out = tmp_path / "out"
    assert _register(paths, out, capsys)["moving_resampled_to_fixed_grid"]
    fixed = sitk.ReadImage(str(paths["fixed"]))
    transform = _field_transform(out / "displacement.nii.gz")
    d, _ = nt.io.read_displacement(out / "displacement.nii.gz")
    inside = _in_itk_buffer(d)

    def two_resamples(key: str, labels: bool) -> np.ndarray:
        image = sitk.ReadImage(str(paths[key]))
        interp = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
        pixel = image.GetPixelID() if labels else sitk.sitkFloat64
        onto = sitk.Resample(image, fixed, sitk.Transform(), interp, 0.0, pixel)
        step = tmp_path / f"{key}_on_fixed.nii.gz"
        sitk.WriteImage(onto, str(step))
        return _sitk_resample(step, paths["fixed"], transform, labels=labels)

    ours = _array(out / "warped.nii.gz")
    np.testing.assert_allclose(ours[inside], two_resamples("moving", False)[inside], rtol=0,
                               atol=1e-5)
    labels = _array(out / "warped_labels.nii.gz")
    np.testing.assert_array_equal(labels, two_resamples("moving_labels", True))
    # One Resample of the cropped original extends its border instead of the zeros outside.
    one = _sitk_resample(paths["moving"], paths["fixed"], transform)
    assert np.abs(one - ours).max() > 0.1


# -- --compile says that it compiles -----------------------------------------------------------


def test_compile_announces_the_first_call_per_shape(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(nt, "register", _known_field)  # the notice, not the compiler, is tested
    monkeypatch.setattr(cli, "_COMPILED", set())
    paths = _write(tmp_path)
    argv = [str(paths["fixed"]), str(paths["moving"]), "--compile"]
    assert cli.main([*argv, "-o", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "nadmm-register: compiling the solver for shape 7x64x64 on cpu; the first call " \
           "takes tens of seconds to minutes" in err
    assert "nadmm-register: the first call for shape 7x64x64 took " in err
    assert err.index("compiling the solver") < err.index("the first call for shape")
    assert cli.main([*argv, "-o", str(tmp_path / "b")]) == 0  # compiled in this process
    assert "compil" not in capsys.readouterr().err
    monkeypatch.setattr(cli, "_COMPILED", set())
    assert cli.main([*argv, "-o", str(tmp_path / "c"), "-q"]) == 0
    assert capsys.readouterr().err == ""
    assert cli.main([*argv[:2], "-o", str(tmp_path / "d")]) == 0  # without --compile
    assert "compil" not in capsys.readouterr().err


# -- figures: legend and slice ----------------------------------------------------------------


def _volume_case():
    f, m, fl, ml, spacing = _pair()
    return f, m, fl, ml, _known_field(f, m), spacing


def _contour_colours(ax, dashed: bool) -> set[str]:
    """Colours of the contour sets drawn on ``ax``, dashed or solid."""
    from matplotlib.colors import to_hex
    from matplotlib.contour import ContourSet

    out = set()
    for c in ax.collections:
        if isinstance(c, ContourSet) and (c.get_linestyle()[0][1] is not None) == dashed:
            out.update(to_hex(col) for col in c.get_edgecolor())
    return out


def test_figure_legend_names_labels_and_line_styles():
    f, m, fl, ml, d, spacing = _volume_case()
    k = viz.choose_slice(f, fl)
    ml = ml.clone()
    ml[ml == 1] = 0  # the moving slice lacks label 1: colours must still follow the values
    warped = nt.warp_labels(ml, d)
    fig = viz.plot_registration(f, m, nt.warp(m, d), d, fixed_labels=fl, warped_labels=warped,
                                moving_labels=ml, spacing=spacing, path=None,
                                label_names={1: "RV", 2: "Myo"})
    assert len(fig.legends) == 1
    legend = fig.legends[0]
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts == ["RV", "Myo", "label 3", "fixed labels (solid)",
                     "moving / warped labels (dashed)"]
    handles = legend.legend_handles
    assert [h.get_color() for h in handles[:3]] == [viz.label_colour(v) for v in (1, 2, 3)]
    assert handles[3].get_linestyle() == "-" and handles[4].get_linestyle() == "--"
    fixed_ax, moving_ax = fig.axes[0], fig.axes[1]
    assert _contour_colours(fixed_ax, dashed=False) == {viz.label_colour(v) for v in (1, 2, 3)}
    present = sorted(set(np.unique(ml[0, 0, k].numpy())) - {0})
    assert present == [2, 3]
    assert _contour_colours(moving_ax, dashed=True) == {viz.label_colour(v) for v in present}
    bare = viz.plot_registration(f, m, m, d, path=None)
    assert bare.legends == []  # no label maps, no contours to explain
    with pytest.raises(TypeError, match="label_names"):
        viz.plot_registration(f, m, m, d, fixed_labels=fl, path=None, label_names=["RV"])


def test_figure_states_the_slice_and_why():
    f, m, fl, _, d, _ = _volume_case()
    k = viz.choose_slice(f, fl)
    counts = (fl[0, 0] > 0).sum((1, 2))
    assert int(counts[k]) == int(counts.max())
    title = viz.plot_registration(f, m, m, d, fixed_labels=fl, path=None)._suptitle.get_text()
    assert f"slice {k} of 7 " in title and "the most fixed-label voxels" in title
    title = viz.plot_registration(f, m, m, d, path=None)._suptitle.get_text()
    assert "slice 3 of 7 " in title and "the middle one" in title
    title = viz.plot_registration(f, m, m, d, slice_index=6, path=None)._suptitle.get_text()
    assert "slice 6 of 7 " in title and "as requested" in title
    for bad, error in ((7, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match=r"slice_index: expected"):
            viz.plot_registration(f, m, m, d, slice_index=bad, path=None)
    with pytest.raises(ValueError, match="2D"):
        viz.plot_registration(f[:, :, 0], m[:, :, 0], m[:, :, 0], d[:, 1:, 0], slice_index=0,
                              path=None)


def test_plot_slice_is_checked_and_reaches_the_figure(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(nt, "register", _known_field)
    seen = []
    real = viz.plot_registration

    def recording(*args, **kw):
        seen.append(kw["slice_index"])
        return real(*args, **kw)

    monkeypatch.setattr(viz, "plot_registration", recording)
    paths = _write(tmp_path)
    pair = [str(paths["fixed"]), str(paths["moving"])]
    out = tmp_path / "out"
    assert cli.main([*pair, "-o", str(out), "--plot-slice", "5", "-q"]) == 0  # implies --plot
    assert seen == [5] and (out / "registration.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "summary.json").read_text())["resume_key"]["plot"] == {"slice": 5}
    for argv, status, text in (
        (["--plot-slice", "7"], 1, "--plot-slice 7: expected a slice index in 0..6"),
        (["--plot-slice", "-1"], 2, "expected a slice index (an integer >= 0), got '-1'"),
        (["--plot-slice", "two"], 2, "expected a slice index (an integer >= 0), got 'two'"),
    ):
        bad = tmp_path / f"bad{len(seen)}"
        assert cli.main([*pair, "-o", str(bad), *argv]) == status
        err = capsys.readouterr().err
        assert err.startswith("nadmm-register: error: ") and text in err, err
        assert len(err.strip().splitlines()) == 1 and not bad.exists()
    assert seen == [5]  # nothing registered, nothing plotted for a bad slice
    flat = {k: tmp_path / f"{k}2d.nii.gz" for k in ("fixed", "moving")}
    geo = Geometry.default((64, 64), (1.5, 1.5))
    f, m = _pair()[:2]
    for key, t in (("fixed", f), ("moving", m)):
        write_image(t[:, :, 3].contiguous(), geo, flat[key])
    assert cli.main([str(flat["fixed"]), str(flat["moving"]), "-o", str(tmp_path / "flat"),
                     "--plot-slice", "0"]) == 1
    assert "the images are 2D" in capsys.readouterr().err


# -- nadmm-tune -o ----------------------------------------------------------------------------


def test_tune_output_that_cannot_be_written_is_named(tmp_path, monkeypatch, capsys):
    csv = _write_pairs(tmp_path, n=2)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for output, reason in ((tmp_path / "missing" / "t.json", "no such folder"),
                           (blocker / "t.json", "no such folder"),
                           (tmp_path, "it is a directory")):
        rc = cli.tune_main(["--pairs", str(csv), "-o", str(output), "-q"])
        err = capsys.readouterr().err
        assert rc == 1, err
        assert err == f"nadmm-tune: error: cannot write the settings file '{output}': " \
                      f"{reason}" + (f" '{output.parent}'" if reason == "no such folder"
                                     else "") + "\n"

    class Result:  # a tuning that finished, and a disk that fills up while saving
        val_start = val_best = 0.5
        best_epoch, time_s = 0, 0.0

        def save(self, path):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nt, "tune", lambda *a, **k: Result())
    output = tmp_path / "t.json"
    assert cli.tune_main(["--pairs", str(csv), "-o", str(output), "-q"]) == 1
    err = capsys.readouterr().err
    assert err == (f"nadmm-tune: error: cannot write the settings file '{output}': No space "
                   "left on device\n")


# -- the console scripts' shared pieces --------------------------------------------------------


def test_one_line():
    assert one_line(ValueError("a\n  b\tc ")) == "a b c"
    assert one_line(OSError()) == "OSError"
    assert one_line("x\ny") == "x y" and one_line("") == ""


def test_run_console_exit_statuses(capsys):
    def parse():
        return "args"

    def raising(exc):
        def run(args):
            assert args == "args"
            raise exc
        return run

    common = dict(interrupted=lambda args: f"stopped {args}", expected=(LookupError,))
    cases = [
        (raising(LookupError("user\nerror")), 1, "p: error: user error\n"),
        (raising(OSError("disk")), 1, "p: error: OSError: disk\n"),
        (raising(MemoryError()), 1, "p: error: out of memory\n"),
        (raising(KeyboardInterrupt()), 130, "p: error: stopped args\n"),
        (raising(_cli_common.Terminated()), 143, "p: error: killed\n"),
        (lambda args: 0, 0, ""),
    ]
    before = signal.getsignal(signal.SIGTERM)
    for run, status, err in cases:
        assert _cli_common.run_console("p", parse, run, terminated="killed", **common) == status
        assert capsys.readouterr().err == err
    assert signal.getsignal(signal.SIGTERM) is before
    assert _cli_common.run_console("p", parse, raising(OSError("disk")), failure_type=False,
                                   **common) == 1
    assert capsys.readouterr().err == "p: error: disk\n"
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        _cli_common.run_console("p", parse, raising(ZeroDivisionError()), **common)

    def usage():
        _cli_common.Parser(prog="p").parse_args(["--nope"])

    assert _cli_common.run_console("p", usage, lambda a: 0, **common) == 2
    assert capsys.readouterr().err == "p: error: unrecognized arguments: --nope (see p --help)\n"
    assert _cli_common.run_console("p", lambda: _cli_common.Parser(prog="p").parse_args(["-h"]),
                                   lambda a: 0, **common) == 0
    assert "usage: p" in capsys.readouterr().out
