"""Writes that fail quietly, truncated or NaN-holding inputs, stale staging folders: the I/O
layer must notice each, name the file, and leave nothing that looks complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nadmm_torch import atomic
from nadmm_torch.io import Geometry, read_image, read_labels, write_image

EXTS = [".nii.gz", ".nii", ".mha", ".nrrd"]


def _image(shape=(6, 20, 24)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand((1, 1, *shape), generator=g)


def _truncating_writer(real_write):
    """sitk.WriteImage as on a full disk: no exception, but only half of the file is there."""

    def write(image, path, *args):
        real_write(image, path, *args)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])

    return write


# -- item: a failed write reports success ------------------------------------------------------


@pytest.mark.parametrize("ext", EXTS)
def test_write_image_detects_a_silently_truncated_file(tmp_path, monkeypatch, ext):
    monkeypatch.setattr(sitk, "WriteImage", _truncating_writer(sitk.WriteImage))
    dest = tmp_path / f"out{ext}"
    with pytest.raises(OSError, match="cannot write") as info:
        write_image(_image(), Geometry.default((6, 20, 24)), dest)
    assert str(dest) in str(info.value)
    assert os.listdir(tmp_path) == []  # no final file, no staging folder


def test_write_image_under_a_file_size_limit(tmp_path):
    """A real short write (RLIMIT_FSIZE, SIGXFSZ ignored): SimpleITK only prints an error."""
    script = f"""
import resource, signal, sys, torch
from nadmm_torch.io import Geometry, write_image
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (8000, 8000))
x = torch.rand(1, 1, 8, 40, 40, generator=torch.Generator().manual_seed(0))
failed = []
for ext in {EXTS!r}:
    try:
        write_image(x, Geometry.default((8, 40, 40)), {str(tmp_path)!r} + "/out" + ext)
    except OSError as exc:
        failed.append(ext)
print(",".join(failed))
"""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().split(",") == EXTS, proc.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name, good, bad", [
    ("a.json", b'{"x": [1, 2]}', b'{"x": [1,'),
    ("a.png", None, None),
    ("a.gz", None, None),
    ("a.pt", None, None),
])
def test_atomic_write_verifies_each_kind(tmp_path, name, good, bad):
    if name.endswith(".png"):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = plt.figure()
        fig.savefig(tmp_path / "ref.png")
        plt.close(fig)
        good = (tmp_path / "ref.png").read_bytes()
        (tmp_path / "ref.png").unlink()
    elif name.endswith(".gz"):
        import gzip

        good = gzip.compress(os.urandom(5000))
    elif name.endswith(".pt"):
        torch.save(torch.arange(1000), tmp_path / "ref.pt")
        good = (tmp_path / "ref.pt").read_bytes()
        (tmp_path / "ref.pt").unlink()
    bad = good[: len(good) // 2] if bad is None else bad
    dest = tmp_path / name
    atomic.atomic_write(dest, lambda p: p.write_bytes(good))
    assert dest.read_bytes() == good
    with pytest.raises(OSError, match=f"cannot write '{dest}'"):
        atomic.atomic_write(dest, lambda p: p.write_bytes(bad))
    assert dest.read_bytes() == good  # the previous version is kept
    assert os.listdir(tmp_path) == [name]
    with pytest.raises(OSError, match="empty"):
        atomic.atomic_write(tmp_path / "b.json", lambda p: p.write_bytes(b""))
    assert os.listdir(tmp_path) == [name]


# -- item: a truncated .nii.gz input is accepted ----------------------------------------------


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_truncated_nifti_input_is_refused(tmp_path, ext):
    full = tmp_path / f"full{ext}"
    write_image(_image(), Geometry.default((6, 20, 24)), full)
    read_image(full)  # the complete file is fine
    cut = tmp_path / f"cut{ext}"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated") as info:
        read_image(cut)
    assert str(cut) in str(info.value)
    labels = tmp_path / f"labels{ext}"
    write_image(torch.randint(0, 4, (1, 1, 6, 20, 24)), Geometry.default((6, 20, 24)), labels)
    data = labels.read_bytes()
    labels.write_bytes(data[: len(data) - 200])
    with pytest.raises(ValueError, match="truncated"):
        read_labels(labels)


# -- item: a NaN voxel in a NIfTI input is read as 0 -------------------------------------------


@pytest.mark.parametrize("writer", ["sitk", "nibabel"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_in_nifti_input_is_reported(tmp_path, writer, value):
    a = np.random.default_rng(0).random((6, 20, 24)).astype(np.float32)
    a[2, 3, 4] = value
    path = tmp_path / "nan.nii.gz"
    if writer == "sitk":
        sitk.WriteImage(sitk.GetImageFromArray(a), str(path))
    else:
        nib.save(nib.Nifti1Image(a, np.eye(4)), str(path))
    with pytest.raises(ValueError, match="non-finite") as info:
        read_image(path)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="non-finite"):
        read_labels(path)
    # the same file in MetaImage was always caught; still is
    sitk.WriteImage(sitk.GetImageFromArray(a), str(tmp_path / "nan.mha"))
    with pytest.raises(ValueError, match="non-finite"):
        read_image(tmp_path / "nan.mha")


# -- stale staging folders ---------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_staging_folders_of_dead_processes_are_removed(tmp_path):
    host = atomic._host_tag()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = tmp_path / f".nadmm-tmp-{_dead_pid()}-{host}-abc"
        alive = tmp_path / f".nadmm-tmp-{live.pid}-{host}-abc"
        other_host = tmp_path / f".nadmm-tmp-{_dead_pid()}-00000000-abc"
        legacy = tmp_path / ".nadmm-tmp-q1w2e3"  # no pid in the name: cannot tell, kept
        user = tmp_path / "results"
        for d in (dead, alive, other_host, legacy, user):
            d.mkdir()
            (d / "x.nii.gz").write_bytes(b"partial")
        write_image(_image(), Geometry.default((6, 20, 24)), tmp_path / "new.nii.gz")
        names = set(os.listdir(tmp_path))
        assert dead.name not in names
        assert {alive.name, other_host.name, legacy.name, "results", "new.nii.gz"} <= names
    finally:
        live.kill()
        live.wait()
    atomic.clean_stale(tmp_path)  # now the sleeper is gone too
    assert alive.name not in os.listdir(tmp_path)


def test_staging_commit_replaces_the_set_and_marks_it_last(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    for name in ("a.json", "old.json", "summary.json", "user.txt"):
        (target / name).write_text(json.dumps(name))
    with atomic.Staging(tmp_path, target=target) as st:
        st.add("a.json", lambda p: p.write_text('"new a"'))
        st.add("summary.json", lambda p: p.write_text('"new summary"'))
        st.commit(target, replaces=("a.json", "old.json", "summary.json"),
                  last=("summary.json",))
    assert sorted(os.listdir(target)) == ["a.json", "summary.json", "user.txt"]
    assert json.loads((target / "a.json").read_text()) == "new a"
    assert sorted(os.listdir(tmp_path)) == ["out"]
