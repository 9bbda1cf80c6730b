"""``nadmm-apply``: apply a saved transform to another image or label map.

::

    nadmm-apply --transform OUT/displacement.nii.gz [--affine OUT/affine.tfm]
                --reference FIXED INPUT -o WARPED [--labels]

* ``--transform``: an ITK displacement field (``displacement.nii.gz`` of ``nadmm-register``,
  ``displacement.mha`` for a one-slice volume, an ANTs warp). It is the whole registration:
  with ``nadmm-register --affine`` it already includes the affine stage.
* ``--affine``: an ITK affine (``affine.tfm``, an ANTs ``.mat``). Alone, it applies that affine
  (e.g. the affine stage by itself); with ``--transform``, the displacement is applied first,
  then the affine (``antsApplyTransforms -t DISP -t AFFINE``), for a displacement estimated
  on an image already moved by the affine. Pairing a run's ``displacement.nii.gz`` with the
  same run's ``affine.tfm`` would apply the affine twice and is refused.
* ``--reference``: the fixed image; the output is on its grid. An input on another grid is
  resampled into it through physical space first (linear; nearest neighbour for labels), as
  ``nadmm-register`` does, so applying a run's transform to its own moving image gives back
  its ``warped.nii.gz`` (and ``warped_labels.nii.gz`` with ``--labels``).
* ``--labels``: the input is an integer label map, warped by argmax of its warped one-hot.

The output is written atomically and verified (:mod:`nadmm_torch.atomic`): it appears complete
or not at all. Exit status: 0 done, 1 failure (unreadable input, failed write), 2 usage, 130
interrupted. Errors are one line, ``nadmm-apply: error: …``, naming the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ._cli_common import Parser, UsageError, run_console

PROG = "nadmm-apply"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Apply a transform saved by nadmm-register (or any ITK displacement field "
        "/ affine) to an image or label map.",
        epilog="Example: nadmm-apply --transform out/displacement.nii.gz --reference fixed.nii.gz"
        " moving_labels.nii.gz -o warped_labels.nii.gz --labels",
    )
    p.add_argument("input", help="image (or label map, with --labels) to warp; any grid")
    p.add_argument("-o", "--output", required=True, help="output file (format from extension)")
    p.add_argument("-r", "--reference", required=True,
                   help="fixed image: the output's grid (the grid the transform was made on)")
    p.add_argument("-t", "--transform",
                   help="ITK displacement field (displacement.nii.gz of nadmm-register: the "
                   "whole registration, its --affine stage included)")
    p.add_argument("-a", "--affine",
                   help="ITK affine transform (affine.tfm, ANTs .mat). Alone: that affine. With "
                   "--transform: the input is sampled at A(x + d(x)), displacement first "
                   "(antsApplyTransforms -t DISP -t AFFINE); not for a displacement.nii.gz "
                   "and affine.tfm of the same run, which would apply the affine twice")
    p.add_argument("--labels", action="store_true", help="the input is an integer label map")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    return p


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def _check_usage(args: argparse.Namespace) -> None:
    if args.transform is None and args.affine is None:
        raise UsageError("expected --transform, --affine or both (see nadmm-apply --help)")
    out = Path(args.output)
    for kind in ("input", "reference", "transform", "affine"):
        value = getattr(args, kind)
        if value is not None and _same_file(out, Path(value)):
            raise UsageError(f"--output '{out}' is the {kind} file; it would be overwritten")
    if args.transform is not None and args.affine is not None:
        _check_not_twice(Path(args.transform), Path(args.affine))


def _check_not_twice(transform: Path, affine: Path) -> None:
    """Refuse a run's displacement together with the same run's affine (applied twice)."""
    summary = transform.parent / "summary.json"
    if transform.parent.resolve() != affine.parent.resolve() or not summary.is_file():
        return
    try:
        recorded = json.loads(summary.read_text()).get("settings", {}).get("affine")
    except (OSError, ValueError, AttributeError):
        return
    if recorded:
        raise UsageError(
            f"'{transform}' already includes the affine stage of that run ('{affine}'): pass "
            "--transform alone for the registration, or --affine alone for the affine stage"
        )


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    _check_usage(args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 1 failure, 2 usage, 130 Ctrl-C)."""
    return run_console(
        PROG, lambda: _parse(argv), _run,
        interrupted=lambda args: f"interrupted; '{args.output}' was not written",
        failures=(OSError, RuntimeError, ValueError, TypeError), failure_type=False,
    )


def _run(args: argparse.Namespace) -> int:
    from .transforms import apply_file

    info = apply_file(args.input, args.output, args.reference, transform=args.transform,
                      affine=args.affine, labels=args.labels)
    if not args.quiet:
        how = " (input resampled into the reference grid first)" if info["resampled"] else ""
        kind = "labels" if args.labels else "image"
        print(f"{PROG}: wrote {kind} '{args.output}'{how}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
