"""Do the verdicts depend on the seeds? Each study reproduced twice at quick scale, with two disjoint sets
of seeds (0-4 and 5-9 by default), and the verdicts compared claim by claim.

    python bench/bench_seed_agreement.py                      # all five studies
    python bench/bench_seed_agreement.py keskar lili --write  # some, and write the table into RESULTS.md

Target (issue 13): at least 90% of the claims get the same verdict from both sets. Each reproduction
uses its own store and report under --work (default: a temporary directory), so nothing is shared
between the two sets but the code; the time of each is printed beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEADING = "## Verdicts across disjoint seed sets"
RESULTS = Path(__file__).with_name("RESULTS.md")
STUDIES = ("keskar", "hoffer", "breakeven", "kaur", "lili")


def reproduce(study: str, offset: int, seeds: int, work: Path) -> tuple[dict[str, str], float]:
    """{claim id: verdict} and the wall time of one `batchscope reproduce` with seeds offset..offset+seeds-1."""
    out, store = work / f"{study}-{offset}", work / f"{study}-{offset}.db"
    timing = work / f"{study}-{offset}.seconds"  # the first (training) run's time: a rerun on the same --work
    cmd = [sys.executable, "-m", "batchscope.cli", "reproduce", study, "--seeds", str(seeds),  # only rebuilds
           "--seed-offset", str(offset), "--store", str(store), "--out", str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    secs = time.perf_counter() - t0
    if timing.exists():
        secs = float(timing.read_text())
    else:
        timing.write_text(f"{secs:.1f}")
    doc = json.loads((out / "claims.json").read_text())
    return {c["id"]: c["verdict"]["verdict"] for c in doc["claims"]}, secs


def table(rows: list[tuple[str, dict, dict, float, float]]) -> str:
    lines = ["| study | claims | same verdict | agreement | set A (seeds 0-4) | set B (seeds 5-9) | differing claims "
             "| time A | time B |",
             "|---|---|---|---|---|---|---|---|---|"]
    total = same_total = 0
    for study, a, b, ta, tb in rows:
        ids = sorted(set(a) | set(b))
        same = [i for i in ids if a.get(i) == b.get(i)]
        diff = [f"{i} ({a.get(i)} / {b.get(i)})" for i in ids if a.get(i) != b.get(i)]
        total, same_total = total + len(ids), same_total + len(same)

        def counts(v: dict) -> str:
            return ", ".join(f"{sum(x == o for x in v.values())} {o}" for o in ("holds", "fails", "inconclusive", "untested")
                             if any(x == o for x in v.values()))

        lines.append(f"| {study} | {len(ids)} | {len(same)} | {len(same) / max(len(ids), 1):.0%} | {counts(a)} | {counts(b)} | "
                     f"{'; '.join(diff) or '—'} | {ta / 60:.1f} min | {tb / 60:.1f} min |")
    lines.append(f"| **all** | {total} | {same_total} | **{same_total / max(total, 1):.0%}** | | | | | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("studies", nargs="*", default=list(STUDIES))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--work", type=Path, default=None, help="where stores and reports go (default: a temporary directory)")
    ap.add_argument("--write", action="store_true", help=f"replace the '{HEADING}' section of bench/RESULTS.md")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="seed-agreement-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for study in args.studies:
        a, ta = reproduce(study, 0, args.seeds, work)
        b, tb = reproduce(study, args.seeds, args.seeds, work)
        rows.append((study, a, b, ta, tb))
        print(f"{study}: {sum(a[i] == b.get(i) for i in a)}/{len(a)} claims agree "
              f"({ta / 60:.1f} + {tb / 60:.1f} min)", flush=True)
    text = table(rows)
    print(text)
    if args.write:
        import torch

        head = (f"{HEADING}\n\n`python bench/bench_seed_agreement.py --write` — "
                f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; "
                f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores; torch {torch.__version__}. "
                f"Each study at quick scale with seeds 0-{args.seeds - 1} (set A) and {args.seeds}-{2 * args.seeds - 1} (set B), "
                f"default executor. Target: at least 90% of claims with the same verdict.\n\n{text}\n")
        old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
        pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
        new = pattern.sub(head + "\n", old) if pattern.search(old) else old.rstrip() + "\n\n" + head
        RESULTS.write_text(new)


if __name__ == "__main__":
    main()
