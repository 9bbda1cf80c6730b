#!/usr/bin/env python
"""Re-summarise a ``benchmarks/acdc.py`` JSON on a subset of its pairs and print the table.

Usage::

    python benchmarks/summarize_acdc.py --json OUT.json [OUT2.json ...] [--data DIR]
        [--patients report] [--out MERGED.json]

Several JSON files (e.g. one run split over processes by ``--patients``) are merged: per
method, the pairs of all files (a patient seen twice keeps its first record). ``--out`` writes
the merged document in the format of ``benchmarks/acdc.py``.

``--patients``: ``all`` (default), ``tune`` / ``report`` (the fixed split; needs ``--data`` for
the groups) or a comma list of patient IDs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from nadmm_torch.data.acdc import read_acdc_pairs, split, summarize


def _table():
    path = Path(__file__).with_name("acdc.py")
    spec = importlib.util.spec_from_file_location("_acdc_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.markdown_table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", required=True, nargs="+")
    ap.add_argument("--out", default=None, help="write the merged JSON here")
    ap.add_argument("--data", default=None, help="folder with pairs.csv (for tune / report)")
    ap.add_argument("--patients", default="all")
    args = ap.parse_args(argv)
    doc: dict = {"summary": {}, "pairs": {}}
    for path in args.json:
        part = json.loads(Path(path).read_text())
        for m, recs in part["pairs"].items():
            have = {r["patient"] for r in doc["pairs"].get(m, [])}
            doc["pairs"].setdefault(m, []).extend(r for r in recs if r["patient"] not in have)
        for m, s in part["summary"].items():
            doc["summary"].setdefault(m, s)
        for k, v in part.items():
            if k not in ("summary", "pairs"):
                doc.setdefault(k, v)
    if args.patients == "all":
        keep = None
    elif args.patients in ("tune", "report"):
        if args.data is None:
            raise SystemExit("--patients tune/report needs --data")
        tune, report = split(read_acdc_pairs(args.data))
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
    print(f"{', '.join(args.json)}: patients {args.patients}, pairs per method {n}")
    if args.out:
        for m, recs in doc["pairs"].items():
            recs.sort(key=lambda r: r["patient"])
            doc["summary"][m] = dict(summarize(recs), device=out[m]["device"])
        Path(args.out).write_text(json.dumps(doc, indent=1))
    print(_table()(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
