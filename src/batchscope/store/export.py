"""Export: every run's metrics wide (one row per run and step) as CSV or Parquet."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from batchscope.errors import BatchscopeError

from .db import Database
from .records import _RUN_COLUMNS, RunRecord, _as_ids, _value


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested spec -> {"optim.lr": 0.1, ...}; lists become JSON strings so every column is scalar."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (list, tuple, dict)):
            out[key] = json.dumps(v, sort_keys=True)
        else:
            out[key] = v
    return out


class Export(Database):
    """export and the wide table behind it."""

    def export(self, path: str | os.PathLike, fmt: str | None = None, run_ids: Iterable[str] | None = None) -> Path:
        """Write metrics wide (one row per run and step) with run_id, status, group, spec columns; the path.

        Columns: run_id, status, group, the flattened spec ("optim.lr"; lists as JSON), step, epoch, then one
        column per metric name. A spec key that collides with those names is prefixed "spec.", a metric
        named like a run column "metric.". A metric not logged at a step is empty (null); NaN stays NaN.
        fmt is "csv" or "parquet" (default: from the suffix). The file is replaced atomically.
        """
        out = Path(path).expanduser()
        if fmt is None:
            fmt = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}.get(out.suffix.lower())
            if fmt is None:
                raise BatchscopeError(f"{out}: cannot tell the export format from the suffix; use .csv or .parquet")
        if fmt not in ("csv", "parquet"):
            raise BatchscopeError(f"{out}: unknown export format {fmt!r}; expected 'csv' or 'parquet'")
        if fmt == "parquet":
            try:
                import pyarrow as pa
                import pyarrow.parquet as pq
            except ImportError:
                raise BatchscopeError(
                    f"{out}: Parquet export needs pyarrow (pip install 'batchscope[parquet]'), or export to .csv"
                ) from None

        columns, rows, n_metrics = self._wide(run_ids)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        try:
            if fmt == "csv":
                with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
                    w = csv.writer(f)
                    w.writerow(columns)
                    w.writerows(["" if v is None else v for v in r] for r in rows)
            else:
                os.close(fd)
                n_fixed = len(columns) - n_metrics
                arrays = []
                for j, name in enumerate(columns):
                    values = [r[j] for r in rows]
                    if j >= n_fixed:  # metrics: always float64, so NaN and null stay distinct
                        arrays.append(pa.array(values, type=pa.float64()))
                    elif name == "step":
                        arrays.append(pa.array(values, type=pa.int64()))
                    else:
                        try:
                            arrays.append(pa.array(values))
                        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
                            # Mixed types across runs (a number here, a string there): keep it readable.
                            arrays.append(pa.array([None if v is None else str(v) for v in values]))
                pq.write_table(pa.table(arrays, names=columns), tmp)
            os.replace(tmp, out)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return out

    def _wide(self, run_ids: Iterable[str] | None) -> tuple[list[str], list[list[Any]], int]:
        """Columns, rows and number of (trailing) metric columns of the wide export, from one snapshot."""
        with self._read() as c:
            if run_ids is None:
                records = [
                    RunRecord._from_row(r)
                    for r in c.execute(f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY created, rowid")
                ]
            else:
                records = []
                for run_id in dict.fromkeys(_as_ids(run_ids)):
                    row = c.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)).fetchone()
                    if row is None:
                        raise KeyError(f"unknown run {run_id!r} in {self.path}")
                    records.append(RunRecord._from_row(row))
            per_run = []
            metric_names: dict[str, None] = {}
            for rec in records:
                steps: dict[int, dict[str, Any]] = {}
                for name, step, value, epoch in c.execute(
                    "SELECT name, step, value, epoch FROM metrics WHERE run_id = ? ORDER BY step, name",
                    (rec.run_id,),
                ):
                    metric_names.setdefault(name)
                    cell = steps.setdefault(step, {"epoch": None})
                    cell[name] = _value(value)
                    if epoch is not None:
                        cell["epoch"] = epoch
                per_run.append((rec, _flatten(rec.spec), steps))

        fixed = ["run_id", "status", "group"]
        metric_cols = {n: (f"metric.{n}" if n in fixed + ["step", "epoch"] else n) for n in metric_names}
        taken = set(fixed) | {"step", "epoch"} | set(metric_cols.values())
        spec_keys: dict[str, None] = {}
        for _, flat, _ in per_run:
            spec_keys.update(dict.fromkeys(flat))
        spec_cols = {k: (f"spec.{k}" if k in taken else k) for k in spec_keys}

        columns = fixed + list(spec_cols.values()) + ["step", "epoch"] + list(metric_cols.values())
        rows: list[list[Any]] = []
        for rec, flat, steps in per_run:
            head = [rec.run_id, rec.status, rec.group] + [flat.get(k) for k in spec_cols]
            for step in sorted(steps):
                cell = steps[step]
                rows.append(head + [step, cell["epoch"]] + [cell.get(n) for n in metric_cols])
        return columns, rows, len(metric_cols)
