#!/usr/bin/env python
"""Re-summarise a ``benchmarks/acdc.py`` JSON on a subset of its pairs and print the table.

Usage::

    python benchmarks/summarize_acdc.py --json OUT.json [--data DIR] [--patients report]

``--patients``: ``all`` (default), ``tune`` / ``report`` (the fixed split; needs ``--data`` for
the groups) or a comma list of patient IDs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from nadmm_torch.data.acdc import read_pairs, split, summarize


def _table():
    path = Path(__file__).with_name("acdc.py")
    spec = importlib.util.spec_from_file_location("_acdc_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.markdown_table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--data", default=None, help="folder with pairs.csv (for tune / report)")
    ap.add_argument("--patients", default="all")
    args = ap.parse_args(argv)
    doc = json.loads(Path(args.json).read_text())
    if args.patients == "all":
        keep = None
    elif args.patients in ("tune", "report"):
        if args.data is None:
            raise SystemExit("--patients tune/report needs --data")
        tune, report = split(read_pairs(args.data))
        keep = set(tune if args.patients == "tune" else report)
    else:
        keep = {p.strip() for p in args.patients.split(",") if p.strip()}
    out = {}
    for m, recs in doc["pairs"].items():
        sel = [r for r in recs if keep is None or r["patient"] in keep]
        s = summarize(sel)
        s["device"] = doc["summary"].get(m, {}).get("device", "")
        out[m] = s
    n = {m: s["n_pairs"] for m, s in out.items()}
    print(f"{args.json}: patients {args.patients}, pairs per method {n}")
    print(_table()(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
