"""Digest of every run's stored metrics in a store, to check that a change leaves training bit-identical.

    python bench/metrics_digest.py STORE [--out FILE]       # one line per run: run id, status, steps, sha256
    python bench/metrics_digest.py --compare A.json B.json   # runs that differ (exit 1 if any)

The digest covers each metric's exact float value (repr) at each step, the run's status and its final
metrics, so two stores agree only if training was bit-identical. Runs are matched by run id.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

from batchscope.store import Store

TIMINGS = {"seconds", "probe_seconds"}  # wall-clock values, never equal between two runs


def timing(name: str) -> bool:
    return name in TIMINGS or name.startswith("probe_seconds_")  # each probe's own seconds too


def digest(path: str) -> dict[str, dict]:
    out = {}
    with Store(path) as store:
        for run in store.runs():
            series = store.metrics(run.run_id)
            body = json.dumps({k: [(s, repr(v)) for s, v in rows] for k, rows in sorted(series.items())
                               if not timing(k)}, sort_keys=True)
            final = {k: repr(v) for k, v in sorted((run.final or {}).items()) if not timing(k)}
            h = hashlib.sha256((body + json.dumps(final, sort_keys=True) + run.status).encode()).hexdigest()
            out[run.run_id] = {"status": run.status, "points": sum(len(v) for v in series.values()), "sha256": h}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("store", nargs="?")
    ap.add_argument("--out")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"))
    a = ap.parse_args()
    if a.compare:
        x, y = (json.load(open(p)) for p in a.compare)
        missing = sorted(set(x) ^ set(y))
        differ = sorted(k for k in set(x) & set(y) if x[k]["sha256"] != y[k]["sha256"])
        print(f"{len(set(x) & set(y))} runs in both; {len(differ)} differ; {len(missing)} in one store only")
        for k in differ + missing:
            print("  ", k, x.get(k, {}).get("status"), y.get(k, {}).get("status"))
        return 1 if differ or missing else 0
    if not a.store:
        ap.error("give a store, or --compare A B")
    d = digest(a.store)
    text = json.dumps(d, indent=1, sort_keys=True)
    if a.out:
        open(a.out, "w").write(text)
    else:
        sys.stdout.write(text + "\n")
    print(f"{len(d)} runs", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
