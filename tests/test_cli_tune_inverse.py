"""``nadmm-tune`` and ``nadmm-register --preset-file``: a settings file from the command line."""

import json

import torch

from nadmm_torch.cli import main, tune_main
from nadmm_torch.data.sample import load_sample
from nadmm_torch.io import Geometry, write_image


def _write_pairs(folder, n=3, labels=True):
    s = load_sample()
    geo = Geometry.default((64, 64), (1.5, 1.5))
    rows = ["fixed,moving" + (",fixed_labels,moving_labels" if labels else "")]
    for z in range(1, 1 + n):
        crop = (slice(None), slice(None), z, slice(32, 96), slice(32, 96))
        names = []
        for key in ("fixed", "moving") + (("fixed_labels", "moving_labels") if labels else ()):
            path = folder / f"{key}{z}.nii.gz"
            write_image(getattr(s, key)[crop].contiguous(), geo, path)
            names.append(path.name)
        rows.append(",".join(names))
    csv = folder / "pairs.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def test_tune_writes_a_settings_file_that_register_loads(tmp_path, capsys):
    csv = _write_pairs(tmp_path)
    out = tmp_path / "tuned.json"
    assert tune_main(["--pairs", str(csv), "-o", str(out), "--epochs", "1", "--val-pairs", "1",
                      "--data-term", "l1", "-q"]) == 0
    doc = json.loads(out.read_text())
    assert doc["data_term"] == "l1" and len(doc["overrides"]["lam"]) == 3
    fixed, moving = tmp_path / "fixed1.nii.gz", tmp_path / "moving1.nii.gz"
    assert main([str(fixed), str(moving), "-o", str(tmp_path / "reg"), "--preset-file", str(out),
                 "-q"]) == 0
    summary = json.loads((tmp_path / "reg" / "summary.json").read_text())
    assert summary["settings"]["preset"] == str(out)
    assert "data_term" not in summary["settings"]  # the file's l1, not the CLI's default
    import nadmm_torch as nt

    d_file = nt.register(torch.zeros(1, 1, 8, 8).normal_(), torch.zeros(1, 1, 8, 8).normal_(),
                         preset=str(out))
    assert d_file.shape == (1, 2, 8, 8)


def test_tune_reports_bad_input(tmp_path, capsys):
    assert tune_main(["--pairs", str(tmp_path / "missing.csv"), "-o", str(tmp_path / "t.json"),
                      "-q"]) == 1
    assert "nadmm-tune: error:" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()
    assert tune_main(["-o", "x.json"]) == 2


def test_register_writes_the_inverse_on_request(tmp_path, capsys):
    import SimpleITK as sitk

    _write_pairs(tmp_path, n=1, labels=False)
    out = tmp_path / "reg"
    assert main([str(tmp_path / "fixed1.nii.gz"), str(tmp_path / "moving1.nii.gz"), "-o",
                 str(out), "--inverse", "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "inverse_displacement.nii.gz" in summary["outputs"]
    assert summary["metrics"]["inverse_residual_d_of_inverse_p99"] < 0.05
    inv = sitk.ReadImage(str(out / "inverse_displacement.nii.gz"))
    assert inv.GetNumberOfComponentsPerPixel() == 2 and inv.GetSize() == (64, 64)


def test_register_returns_the_inverse():
    import nadmm_torch as nt
    from nadmm_torch.ops.inverse import inverse_residuals

    s = load_sample()
    f, m = s.fixed[:, :, 3, 32:96, 32:96], s.moving[:, :, 3, 32:96, 32:96]
    d, e = nt.register(f, m, spacing=(1.5, 1.5), return_inverse=True)
    torch.testing.assert_close(d, nt.register(f, m, spacing=(1.5, 1.5)))
    right, _ = inverse_residuals(d, e)
    assert float(right.mean()) < 0.01 and float(d.abs().max()) > 0.5


def test_cohort_prints_a_line_per_pair_off_a_terminal(tmp_path, capsys):
    csv = _write_pairs(tmp_path, n=2)
    assert main(["--pairs", str(csv), "-o", str(tmp_path / "cohort")]) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "] " in ln and ": done" in ln]
    assert len(lines) == 2 and lines[0].startswith("nadmm-register: [1/2] ")
    assert "Dice" in lines[0] and " s" in lines[0]
    assert main(["--pairs", str(csv), "-o", str(tmp_path / "cohort")]) == 0  # resumed
    assert capsys.readouterr().err.count(": skipped") == 2
