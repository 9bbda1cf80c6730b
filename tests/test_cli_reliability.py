"""nadmm-register against failures and mix-ups: short writes, truncated inputs, a cohort whose
rows or settings change between runs, a re-run into an old output folder, hostile CSV files,
killed runs. Each case must end in a clear error or a correct result, never a complete-looking
wrong one."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import nadmm_torch
from nadmm_torch import cli
from nadmm_torch.config import SETTINGS_FORMAT
from tests.test_cli import _assert_one_line_error, _cohort, _known_field, _run, _write_pair

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def _counting(calls: list):
    def solver(fixed, moving, **kw):
        calls.extend([kw] * fixed.shape[0])  # one entry per pair (a batch registers several)
        return _known_field(fixed, moving)

    return solver


def _staging(folder: Path) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith(".nadmm-tmp")] if folder.is_dir() else []


def _subprocess(body: str, **kw) -> subprocess.Popen:
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        import nadmm_torch
        from test_cli import _known_field
    """) + textwrap.dedent(body)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


# -- a failed write reports success ------------------------------------------------------------


def test_short_write_fails_the_pair_and_leaves_no_finished_output(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(nadmm_torch, "register", _known_field)
    paths = _write_pair(tmp_path)
    ref = tmp_path / "ref"
    rc, _, err = _run([paths["fixed"], paths["moving"], "-o", ref, "-q",
                       "--moving-labels", paths["moving_labels"]], capsys)
    assert rc == 0, err
    sizes = {n: (ref / n).stat().st_size for n in os.listdir(ref)}
    limit = sizes["warped.nii.gz"] + 1  # the first image fits, the displacement field does not
    assert sizes["displacement.nii.gz"] > limit
    csv_path = _cohort(tmp_path)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "keep.txt").write_text("user file")
    proc = _subprocess(f"""
        import resource, signal
        from nadmm_torch.cli import main
        nadmm_torch.register = _known_field
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # as a full disk: writes just come short
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        rc1 = main([{str(paths["fixed"])!r}, {str(paths["moving"])!r},
                    "-o", {str(tmp_path / "one")!r}, "-q",
                    "--moving-labels", {str(paths["moving_labels"])!r}])
        rc2 = main(["--pairs", {str(csv_path)!r}, "-o", {str(tmp_path / "cohort")!r}, "-q"])
        print("RC", rc1, rc2)
    """)
    out, err = proc.communicate(timeout=600)
    assert "RC 1 1" in out, (out, err)
    assert "cannot write" in err and "displacement.nii.gz" in err, err
    assert os.listdir(tmp_path / "one") == ["keep.txt"]  # no summary.json, no truncated field
    cohort = tmp_path / "cohort"
    assert sorted(os.listdir(cohort)) == ["summary.csv", "summary.md"]  # no pair folder
    rows = list(csv.DictReader(open(cohort / "summary.csv")))
    assert [r["status"] for r in rows] == ["failed"] * 3
    assert all("cannot write" in r["message"] for r in rows)


# -- a truncated input is accepted ------------------------------------------------------------


def test_truncated_input_is_refused_with_its_path(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(nadmm_torch, "register", _counting(calls))
    paths = _write_pair(tmp_path)
    data = paths["moving"].read_bytes()
    paths["moving"].write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    rc, stdout, err = _run([paths["fixed"], paths["moving"], "-o", out], capsys)
    _assert_one_line_error(rc, stdout, err, str(paths["moving"]))
    assert "truncated" in err and calls == [] and not out.exists()


# -- cohort resume: by inputs and settings, not by row -----------------------------------------


def _pairs_csv(tmp_path: Path, folders: list[Path]) -> Path:
    """A pairs CSV without an id column, one row per folder made by :func:`_write_pair`."""
    csv_path = tmp_path / "pairs.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["fixed", "moving", "fixed_labels", "moving_labels"])
        for f in folders:
            w.writerow([f"{f.name}/{k}.nii.gz" for k in
                        ("fixed", "moving", "fixed_labels", "moving_labels")])
    return csv_path


def _check_rows_match_results(out: Path) -> list[dict]:
    rows = list(csv.DictReader(open(out / "summary.csv")))
    for r in rows:
        stored = json.loads((out / r["id"] / "summary.json").read_text())
        assert stored["inputs"]["moving"] == r["moving"], r["id"]
        assert stored["inputs"]["fixed"] == r["fixed"], r["id"]
    return rows


def test_cohort_resume_follows_inputs_and_settings_not_rows(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(nadmm_torch, "register", _counting(calls))
    folders = [tmp_path / f"p{i}" for i in range(3)]
    for f in folders:
        f.mkdir()
        _write_pair(f)
    out = tmp_path / "cohort"
    run = ["--pairs", tmp_path / "pairs.csv", "-o", out]

    _pairs_csv(tmp_path, folders[1:])
    assert _run(run, capsys)[0] == 0 and len(calls) == 2
    ids = [r["id"] for r in _check_rows_match_results(out)]

    _pairs_csv(tmp_path, folders)  # a row inserted at the top
    rc, stdout, err = _run(run, capsys)
    assert rc == 0, err
    assert len(calls) == 3 and "1 registered, 2 skipped" in stdout
    rows = _check_rows_match_results(out)
    assert [r["status"] for r in rows] == ["done", "skipped", "skipped"]
    assert [r["id"] for r in rows[1:]] == ids
    assert all(r["id"].startswith("moving_to_fixed_") for r in rows)  # from the inputs
    assert len({r["id"] for r in rows}) == 3

    rc, stdout, err = _run(run + ["--lambda", "100"], capsys)  # other settings: redo all
    assert rc == 0, err
    assert len(calls) == 6 and "3 registered, 0 skipped" in stdout
    assert all(json.loads((out / r["id"] / "summary.json").read_text())["settings"]["lam"] == 100
               for r in _check_rows_match_results(out))
    assert '"lam": 100' in (out / "summary.md").read_text()

    rc, stdout, _ = _run(run + ["--lambda", "100"], capsys)  # same again: nothing to do
    assert len(calls) == 6 and "0 registered, 3 skipped" in stdout

    (folders[2] / "moving.nii.gz").write_bytes((folders[2] / "fixed.nii.gz").read_bytes())
    (out / rows[0]["id"] / "warped.nii.gz").unlink()  # an output gone
    rc, stdout, err = _run(run + ["--lambda", "100"], capsys)
    assert rc == 0, err
    assert len(calls) == 8 and "2 registered, 1 skipped" in stdout
    assert "input(s) changed since the stored result: moving" in err
    assert "output(s) missing: warped.nii.gz" in err
    assert [r["status"] for r in _check_rows_match_results(out)] == ["done", "skipped", "done"]
    rc, stdout, _ = _run(run + ["--lambda", "100", "--force"], capsys)
    assert len(calls) == 11 and "3 registered, 0 skipped" in stdout


# -- re-running one pair into an old output folder ---------------------------------------------


def test_rerun_replaces_the_whole_output_set(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(nadmm_torch, "register", _known_field)
    paths = _write_pair(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    rc, _, err = _run([paths["fixed"], paths["moving"], "-o", out, "-q", "--plot",
                       "--moving-labels", paths["moving_labels"]], capsys)
    assert rc == 0, err
    assert {"warped_labels.nii.gz", "registration.png"} <= set(os.listdir(out))
    rc, _, err = _run([paths["fixed"], paths["moving"], "-o", out, "-q"], capsys)
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(os.listdir(out)) == sorted(summary["outputs"] + ["keep.txt"])
    assert "warped_labels.nii.gz" not in summary["outputs"]
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}

    def fails_while_writing(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("nadmm_torch.io.displacement_to_itk", fails_while_writing)
    rc, stdout, err = _run([paths["fixed"], paths["moving"], "-o", out, "--plot"], capsys)
    _assert_one_line_error(rc, stdout, err, "disk full")
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before  # old set intact


# -- CSV files ---------------------------------------------------------------------------------


def test_bad_pairs_files_fail_before_any_registration(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(nadmm_torch, "register", _counting(calls))
    _write_pair(tmp_path)
    out = tmp_path / "out"
    row = "fixed.nii.gz,moving.nii.gz"
    cases = {
        f"fixed,moving\n{row}\n{row},extra\n": ["line 3", "3 fields", "2 columns"],
        f"fixed,moving,id\n{row},summary.csv\n": ["line 2", "summary.csv"],
        f"fixed,moving,id\n{row},Summary.md\n": ["line 2", "Summary.md"],
        f"fixed,moving,id\n{row},../up\n": ["line 2", "'../up'"],
        f"fixed,moving,id\n{row},a/b\n": ["line 2", "'a/b'"],
        f"fixed,moving,id\n{row},..\n": ["line 2", "'..'"],
        f"fixed,moving,id\n{row},ok\n{row},OK\n": ["line 3", "duplicate id 'OK'", "line 2"],
        f"fixed,moving\n{row}\n{row}\n": ["line 3", "duplicate", "the same pair twice"],
        f"fixed,moving,fixed\n{row},x\n": ["repeats column(s) fixed"],
        "\ufefffixed;moving\n": ["lacks column(s) fixed, moving", "header: fixed;moving"],
    }
    for i, (text, needles) in enumerate(cases.items()):
        csv_path = tmp_path / f"pairs{i}.csv"
        csv_path.write_text(text, encoding="utf-8")
        rc, stdout, err = _run(["--pairs", csv_path, "-o", out], capsys)
        for needle in needles:
            _assert_one_line_error(rc, stdout, err, needle)
        assert str(csv_path) in err
        assert calls == [] and not out.exists(), text
    rc, stdout, err = _run(["--pairs", tmp_path, "-o", out], capsys)
    _assert_one_line_error(rc, stdout, err, "is a directory")
    assert calls == [] and not out.exists()


def test_excel_csv_with_a_byte_order_mark(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(nadmm_torch, "register", _counting(calls))
    _write_pair(tmp_path)
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_bytes("fixed,moving,id\r\nfixed.nii.gz,moving.nii.gz,p1\r\n".encode("utf-8-sig"))
    rc, _, err = _run(["--pairs", csv_path, "-o", tmp_path / "out", "-q"], capsys)
    assert rc == 0, err
    assert len(calls) == 1 and (tmp_path / "out" / "p1" / "summary.json").is_file()


# -- killed runs -------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_killed_run_leaves_no_staging_folder_behind(tmp_path, monkeypatch, capsys, how):
    paths = _write_pair(tmp_path)
    out = tmp_path / "out"
    flag = tmp_path / "writing"
    proc = _subprocess(f"""
        import time
        import nadmm_torch.io
        from nadmm_torch.cli import main
        nadmm_torch.register = _known_field
        real = nadmm_torch.io.displacement_to_itk
        def slow(*args, **kw):  # killed while writing: warped.nii.gz is already staged
            open({str(flag)!r}, "w").close()
            time.sleep(120)
            return real(*args, **kw)
        nadmm_torch.io.displacement_to_itk = slow
        sys.exit(main([{str(paths["fixed"])!r}, {str(paths["moving"])!r},
                       "-o", {str(out)!r}, "-q"]))
    """)
    try:
        deadline = time.time() + 240
        while not flag.exists() and time.time() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        assert flag.exists(), "the run never reached its writing stage"
        assert len(_staging(out)) == 1
        proc.send_signal(getattr(signal, how))
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if how == "SIGTERM":
        assert proc.returncode == 143, err
        assert "terminated" in err
        assert _staging(out) == []
    else:
        assert len(_staging(out)) == 1  # nothing can clean up after SIGKILL ...
        monkeypatch.setattr(nadmm_torch, "register", _known_field)
        rc, _, err = _run([paths["fixed"], paths["moving"], "-o", out, "-q"], capsys)
        assert rc == 0, err
        assert _staging(out) == []  # ... but the next run into the folder does
    assert not (out / "summary.json").exists() or how == "SIGKILL"


def test_sigterm_handler_is_restored(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(nadmm_torch, "register", _known_field)
    before = signal.getsignal(signal.SIGTERM)
    paths = _write_pair(tmp_path)
    assert cli.main([str(paths["fixed"]), str(paths["moving"]), "-o", str(tmp_path / "o"),
                     "-q"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_cohort_resume_redoes_pairs_when_inverse_or_settings_file_changes(tmp_path, monkeypatch,
                                                                          capsys):
    """Every field of the resume key counts: asking for the inverse, or a settings file whose
    content changed, re-registers instead of reusing results made without them."""
    calls = []
    monkeypatch.setattr(nadmm_torch, "register", _counting(calls))
    folder = tmp_path / "p0"
    folder.mkdir()
    _write_pair(folder)
    _pairs_csv(tmp_path, [folder])
    out = tmp_path / "cohort"
    settings = tmp_path / "tuned.json"
    settings.write_text(json.dumps({"format": SETTINGS_FORMAT, "version": 1, "preset": "fast",
                                    "data_term": "l2", "order": 2, "overrides": {}}))
    run = ["--pairs", tmp_path / "pairs.csv", "-o", out, "--preset-file", settings]
    assert _run(run, capsys)[0] == 0 and len(calls) == 1
    assert _run(run, capsys)[0] == 0 and len(calls) == 1  # unchanged: skipped
    rc, _, err = _run(run + ["--inverse"], capsys)
    assert rc == 0 and len(calls) == 2 and "inverse" in err
    doc = json.loads(settings.read_text())
    settings.write_text(json.dumps(doc, indent=2))  # same values, other bytes
    rc, _, err = _run(run + ["--inverse"], capsys)
    assert rc == 0 and len(calls) == 3 and "preset_file" in err
