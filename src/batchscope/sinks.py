"""Sinks: where a run's metrics go besides the store, so they show up where users already look.

A sink is any object with `sink(step, metrics)` (metrics: name -> float at that step) and `close()`; an
optional `flush()` is called whenever the training loop flushes its metrics to the store. Give sinks to
`train_run(..., sinks=[...])`, `TrajectoryProbes(..., sinks=[...])` or the Lightning and HuggingFace probe
callbacks; `batchscope export --format tensorboard|mlflow` (`Store.export`) writes a stored sweep through
the same adapters. The sink belongs to whoever made it: close it when the run is over (or use `with`).

* `TensorBoardSink(logdir)`: one TensorBoard run (an events file in `logdir`), scalars in double precision,
  settings in TensorBoard's HParams tab. Needs `tensorboard` (`pip install 'batchscope[tensorboard]'`).
* `MLflowSink(tracking_uri, experiment, run_name)`: one MLflow run, settings as params and tags. Needs
  `mlflow` (`pip install 'batchscope[mlflow]'`). The URI is any MLflow tracking URI, or a path: a `.db`
  file becomes a SQLite store (MLflow's local default), a directory a file store (`file:`), which MLflow 3
  refuses unless `MLFLOW_ALLOW_FILE_STORE=true`.

The packages are imported when a sink is made, so the core install does not need them; a missing one is
a one-line error naming the extra to install.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, TypeVar, runtime_checkable

from .errors import BatchscopeError

__all__ = ["MLflowSink", "MissingExtraError", "Sink", "TensorBoardSink", "as_tracking_uri", "flush_all", "settings_of"]


@runtime_checkable
class Sink(Protocol):
    """Receives every logged (step, metrics) row; `close()` ends it (flushes what is buffered)."""

    def __call__(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class MissingExtraError(BatchscopeError, ImportError):
    """An optional package that a sink or integration needs is not installed."""


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import `module`, or fail in one line naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"{what} needs the {module.split('.')[0]} package ({e.name or module} is not installed): "
            f"pip install 'batchscope[{extra}]'"
        ) from None


def flush_all(sinks: list[Any] | tuple[Any, ...]) -> None:
    """Flush the sinks that can (the optional part of the protocol)."""
    for s in sinks:
        flush = getattr(s, "flush", None)
        if callable(flush):
            flush()


def settings_of(spec: Mapping[str, Any], prefix: str = "") -> dict[str, str | float | int | bool]:
    """A nested spec as flat scalar settings ({"optim.lr": 0.1, ...}); lists, dicts and None as JSON text."""
    out: dict[str, str | float | int | bool] = {}
    for k, v in spec.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(settings_of(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = json.dumps(v, sort_keys=True, default=str)
    return out


_S = TypeVar("_S", bound="_Closing")


class _Closing:
    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


# -- TensorBoard --------------------------------------------------------------------------------
class TensorBoardSink(_Closing):
    """Metrics as TensorBoard scalars in `logdir` (one run), through torch.utils.tensorboard's SummaryWriter.

    Scalars are written in double precision (TensorBoard's tensor-valued scalars), so what TensorBoard reads
    back is the value logged. `hparams`: settings shown in the HParams tab with the metrics logged;
    `close(status)`: "done" (default) ends the session as a success, "diverged"/"failed" as a failure.
    """

    def __init__(self, logdir: str | os.PathLike, hparams: Mapping[str, Any] | None = None, *, flush_secs: int = 30) -> None:
        require("tensorboard", "tensorboard", "TensorBoardSink")
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = Path(logdir)
        self.writer = SummaryWriter(log_dir=str(self.logdir), flush_secs=flush_secs)
        self.hparams = None if hparams is None else settings_of(hparams)
        self._names: dict[str, None] = {}
        self._closed = False
        if self.hparams:
            from torch.utils.tensorboard.summary import hparams as hp_summary

            _, start, _ = hp_summary(self.hparams, {})
            self.writer.file_writer.add_summary(start)  # the session's settings, visible while it runs

    def __call__(self, step: int, metrics: Mapping[str, float], walltime: float | None = None) -> None:
        for name, value in metrics.items():
            self._names.setdefault(name)
            self.writer.add_scalar(name, float(value), int(step), walltime=walltime, new_style=True, double_precision=True)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, status: str = "done") -> None:
        if self._closed:
            return
        self._closed = True
        if self.hparams:
            from torch.utils.tensorboard.summary import hparams as hp_summary

            # the experiment lists the metrics seen, so HParams shows them as columns; the end carries the status
            experiment, _, end = hp_summary(self.hparams, dict.fromkeys(self._names, 0.0))
            self.writer.file_writer.add_summary(experiment)
            if status not in ("running", "pending"):  # a snapshot of a run under way has not ended
                if status != "done":  # torch writes STATUS_SUCCESS whatever happened
                    end.value[0].metadata.plugin_data.content = _failed(end.value[0].metadata.plugin_data.content)
                self.writer.file_writer.add_summary(end)
        self.writer.close()


def _failed(content: bytes) -> bytes:
    """A session-end record saying the session failed (a diverged or failed run)."""
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    data = plugin_data_pb2.HParamsPluginData.FromString(content)
    data.session_end_info.status = api_pb2.STATUS_FAILURE
    return data.SerializeToString()


# -- MLflow -------------------------------------------------------------------------------------
_MLFLOW_STATUS = {"done": "FINISHED", "diverged": "FAILED", "failed": "FAILED", "killed": "KILLED"}
_MLFLOW_NAME = re.compile(r"[^A-Za-z0-9_\-. /]")  # what every MLflow >= 2.10 accepts in a metric, param or tag name
_BATCH = 1000  # MLflow's limit on metrics in one log_batch call (params and tags: 100)


def as_tracking_uri(where: str | os.PathLike | None) -> str | None:
    """An MLflow tracking URI from a URI or a path: `*.db` -> SQLite store, anything else -> file store."""
    if where is None:
        return None
    s = str(where)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", s) and not re.match(r"^[A-Za-z]:[\\/]", s):
        return s  # already a URI (sqlite:///, file:, http(s)://, databricks, ...)
    p = Path(s).expanduser().resolve()
    if p.suffix in (".db", ".sqlite", ".sqlite3"):
        p.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{p}"
    return p.as_uri()


def mlflow_name(name: str) -> str:
    """`name` with each character MLflow refuses in a name replaced by '_' (probe labels may hold '=' or '+')."""
    return _MLFLOW_NAME.sub("_", name)


class MLflowSink(_Closing):
    """Metrics as one MLflow run (created in `experiment`, made if absent), via MlflowClient.

    No global MLflow state is touched (no active run): several sinks can log at once. `params` and `tags`:
    settings (flattened like a spec, values as text, cut to MLflow's length limit) and labels of the run.
    `close(status)` ends the run: "done" -> FINISHED, "diverged"/"failed" -> FAILED. Names with characters
    MLflow refuses are logged with those replaced by '_'.
    """

    def __init__(
        self,
        tracking_uri: str | os.PathLike | None = None,
        experiment: str = "batchscope",
        run_name: str | None = None,
        *,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        start_time: float | None = None,
    ) -> None:
        require("mlflow", "mlflow", "MLflowSink")
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.tracking_uri = as_tracking_uri(tracking_uri)
        try:
            self.client = MlflowClient(tracking_uri=self.tracking_uri)
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
            if exp is not None and exp.lifecycle_stage == "deleted":  # its name is still taken: bring it back
                self.client.restore_experiment(exp_id)
            run = self.client.create_run(
                exp_id, run_name=run_name, start_time=None if start_time is None else int(start_time * 1000),
                tags={mlflow_name(k): str(v) for k, v in (tags or {}).items()},
            )
        except MlflowException as e:
            raise BatchscopeError(_mlflow_error(self.tracking_uri, e)) from None
        self.experiment_id, self.run_id = exp_id, run.info.run_id
        self._closed = False
        if params:
            limit = _param_limit()
            items = [Param(mlflow_name(k), str(v)[:limit]) for k, v in settings_of(params).items()]
            for i in range(0, len(items), 100):  # MLflow's limit on params in one call
                self.client.log_batch(self.run_id, params=items[i : i + 100])

    def __call__(self, step: int, metrics: Mapping[str, float], timestamp: float | None = None) -> None:
        self.log_rows([(step, metrics)], timestamp)

    def delete_others(self, tag: str, value: str) -> None:
        """Delete (MLflow's recoverable delete) the experiment's other runs tagged `tag` = `value`: a re-export."""
        quoted = value.replace("\\", "\\\\").replace("'", "\\'")
        for run in self.client.search_runs([self.experiment_id], filter_string=f"tags.`{mlflow_name(tag)}` = '{quoted}'"):
            if run.info.run_id != self.run_id:
                self.client.delete_run(run.info.run_id)

    def log_rows(self, rows: Sequence[tuple[int, Mapping[str, float]]], timestamp: float | None = None) -> None:
        """Many steps at once, in batches of MLflow's limit (an export's whole history)."""
        from mlflow.entities import Metric

        ms = int((time.time() if timestamp is None else timestamp) * 1000)
        metrics = [Metric(mlflow_name(k), float(v), ms, int(s)) for s, m in rows for k, v in m.items()]
        for i in range(0, len(metrics), _BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + _BATCH])

    def close(self, status: str = "done", end_time: float | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        if status in ("running", "pending"):
            return  # a snapshot of a run still under way: leave it RUNNING, as it is
        self.client.set_terminated(self.run_id, _MLFLOW_STATUS.get(status, "FAILED"),
                                   end_time=None if end_time is None else int(end_time * 1000))


def _param_limit() -> int:
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        return int(MAX_PARAM_VAL_LENGTH)
    except ImportError:  # pragma: no cover - every MLflow we support has it
        return 500


def _mlflow_error(uri: str | None, e: BaseException) -> str:
    """One line for an MLflow store that cannot be opened."""
    text = str(getattr(e, "message", None) or e).strip()
    where = f"MLflow at {uri or 'its default tracking URI'}"
    if "MLFLOW_ALLOW_FILE_STORE" in text:  # MLflow 3 keeps its file store in maintenance mode
        return (f"{where}: MLflow refuses its file store; give a .db path (a SQLite store) or set "
                "MLFLOW_ALLOW_FILE_STORE=true")
    return f"{where}: {text.splitlines()[0] if text else type(e).__name__}"
