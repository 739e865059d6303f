"""Export: every run's metrics wide (one row per run and step) as CSV or Parquet, or each run to TensorBoard or
MLflow (through batchscope.sinks)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import sqlite3
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from batchscope.errors import BatchscopeError
from batchscope.sinks import MLflowSink, TensorBoardSink, as_tracking_uri, require

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
        Each run to a TensorBoard or an MLflow run instead: `export_runs`.
        """
        out = Path(path).expanduser()
        if fmt is None:
            fmt = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}.get(out.suffix.lower())
            if fmt is None:
                raise BatchscopeError(f"{out}: cannot tell the export format from the suffix; use .csv or .parquet, "
                                      "or give the format (tensorboard, mlflow)")
        if fmt not in ("csv", "parquet"):
            raise BatchscopeError(f"{out}: unknown export format {fmt!r}; expected csv or parquet (tensorboard and mlflow: "
                                  "Store.export_runs)")
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

    def export_runs(self, out: str | os.PathLike, fmt: str, run_ids: Iterable[str] | None = None,
                    experiment: str | None = None) -> str:
        """Write each run's metrics, with its settings, as one TensorBoard or one MLflow run; where they went.

        tensorboard: `out/<group>/<run_id>/` (`out/<run_id>/` without a group), scalars at each stored step
        in double precision, the flattened spec, status and group in the HParams tab; exporting again
        replaces a run's events files. mlflow: `out` is a tracking URI or a path (a `.db` file: a SQLite
        store; a folder: a file store), runs in `experiment` (default: the store's file name without its
        suffix) named by run id, the flattened spec as params, status, group and run id as tags
        (`batchscope.*`), FINISHED/FAILED by status (a run under way stays RUNNING); exporting again
        replaces the earlier export of a run (deleted the way MLflow deletes: recoverably).
        """
        if fmt == "tensorboard":
            require("tensorboard", "tensorboard", "export to TensorBoard")
        elif fmt == "mlflow":
            require("mlflow", "mlflow", "export to MLflow")
        else:
            raise BatchscopeError(f"{out}: unknown export format {fmt!r}; expected tensorboard or mlflow")
        runs = self._histories(run_ids)
        if fmt == "tensorboard":
            root = Path(out).expanduser()
            for rec, rows in runs:
                where = root / _safe(rec.group) / rec.run_id if rec.group else root / rec.run_id
                for old in where.glob("events.out.tfevents.*"):  # ours from an earlier export: replaced
                    old.unlink()
                tb = TensorBoardSink(where, _settings(rec, status=True))
                try:
                    for step, metrics in rows:
                        tb(step, metrics, walltime=rec.created)
                finally:
                    tb.close(rec.status)
            return str(root)
        uri = as_tracking_uri(out)
        name = experiment or Path(self.path).stem
        for rec, rows in runs:
            tags = {"batchscope.run_id": rec.run_id, "batchscope.status": rec.status,
                    "batchscope.group": rec.group or "", "batchscope.version": rec.version or ""}
            ml = MLflowSink(uri, name, rec.run_id, params=_settings(rec), tags=tags, start_time=rec.started or rec.created)
            try:
                ml.delete_others("batchscope.run_id", rec.run_id)
                ml.log_rows(rows, timestamp=rec.finished or rec.started or rec.created)
            finally:
                ml.close(rec.status, end_time=rec.finished)
        return str(uri)

    def _records(self, c: sqlite3.Connection, run_ids: Iterable[str] | None) -> list[RunRecord]:
        """The runs asked for (all, in the order created), or a KeyError naming one the store does not hold."""
        if run_ids is None:
            return [RunRecord._from_row(r) for r in c.execute(f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY created, rowid")]
        records = []
        for run_id in dict.fromkeys(_as_ids(run_ids)):
            row = c.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise KeyError(f"unknown run {run_id!r} in {self.path}")
            records.append(RunRecord._from_row(row))
        return records

    def _histories(self, run_ids: Iterable[str] | None) -> list[tuple[RunRecord, list[tuple[int, dict[str, float]]]]]:
        """Each run with its metrics as (step, {name: value}) rows in step order, from one snapshot."""
        with self._read() as c:
            out = []
            for rec in self._records(c, run_ids):
                steps: dict[int, dict[str, float]] = {}
                for name, step, value in c.execute(
                    "SELECT name, step, value FROM metrics WHERE run_id = ? ORDER BY step, name", (rec.run_id,)
                ):
                    steps.setdefault(step, {})[name] = _value(value)
                out.append((rec, sorted(steps.items())))
        return out

    def _wide(self, run_ids: Iterable[str] | None) -> tuple[list[str], list[list[Any]], int]:
        """Columns, rows and number of (trailing) metric columns of the wide export, from one snapshot."""
        with self._read() as c:
            records = self._records(c, run_ids)
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


def _settings(rec: RunRecord, status: bool = False) -> dict[str, Any]:
    """A run's settings for a tracker: its flattened spec (and, for TensorBoard's HParams, status and group)."""
    flat = _flatten(rec.spec)
    return {**flat, "batchscope.status": rec.status, "batchscope.group": rec.group or ""} if status else flat


def _safe(name: str) -> str:
    """A group name as one folder name."""
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", name).strip(".") or "_"
