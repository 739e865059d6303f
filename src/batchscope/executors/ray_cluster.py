"""Runs, or fused groups of runs, as Ray tasks: the executor for more machines than one.

Each unit of work (one run, or a stack of runs fused into one vmapped step on a GPU) is a Ray generator
task that asks for the CPUs and (fractional) GPUs it needs. It trains against a `Relay` whose reads come
from a `Snapshot` the driver sends along (the run's resume point, a warm start's source checkpoint) and
whose writes stream back, in order, as the task's yields. The driver alone opens the store and applies
them: one SQLite file, no writers on other machines. Nodes need batchscope installed and, for data sets
read from files, the same paths. A user's factories (model, data, loss named "package.module:callable") travel
with the tasks when their top-level module is the user's own code, not an installed package: its files go to the
object store once, and each worker puts them on its sys.path; installed packages must be installed on every node.

Failures. A worker or node that dies ends its task's stream with a Ray system error, after everything the
task yielded before: the driver re-submits the unit, up to `retries` more times, from the last resume
checkpoint it stored (Ray's own task retries stay off because they would restart from the task's original
arguments), so each run is stored once and what was checkpointed is not redone. A unit that dies on every
attempt is stored as failed with the last error; a training error (bad data, a bug) fails the run at once,
as in every executor, since it would fail again. The driver claims each run under its own pid: when it is
killed, Ray ends its tasks and the claims are stale at once, so running the sweep again resumes each
interrupted run from its last checkpoint and trains nothing that is done.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .. import __version__
from ..errors import BatchscopeError
from ..factories import resolve_device
from ..runs import Claims, OnRunStart, SweepSummary, failure_text
from ..spec import RunSpec, is_factory
from ..store import Store, provenance
from ..train.fused import unfusable_reason
from ..train.loop import Progress
from ..userfactories import pack_modules, shippable_modules, unpack_modules
from .fused import fused_groups
from .relay import Relay, Snapshot, apply_write, train_relayed


@dataclass(frozen=True)
class RaySettings:
    """Where the cluster is and what each unit of work asks of it."""

    address: str | None = None  # None: RAY_ADDRESS, a cluster started on this machine, or a new local one
    retries: int = 2  # re-submissions of a unit whose worker died
    cpus_per_run: float = 1.0
    gpus_per_run: float | None = None  # None: 1 for runs on a GPU, 0 on the CPU; fractions share a GPU
    fuse: bool | None = None  # fuse runs that share a step; None: when the runs use GPUs

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise BatchscopeError(f"--retries {self.retries}: expected 0 or more")
        if self.cpus_per_run <= 0:
            raise BatchscopeError(f"--cpus-per-run {self.cpus_per_run}: expected a positive number")
        if self.gpus_per_run is not None and self.gpus_per_run < 0:
            raise BatchscopeError(f"--gpus-per-run {self.gpus_per_run}: expected 0 or more (fractions share a GPU)")


def import_ray():
    """The ray module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise BatchscopeError("executor ray: the ray package is not installed; pip install 'batchscope[ray]'") from None
    return ray


def _check_reachable(address: str) -> None:
    """Fail in one line, at once, when nothing listens at a host:port address (ray.init would retry for long)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local" and the like: Ray resolves them
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as err:
        raise BatchscopeError(
            f"executor ray: nothing answers at {address} ({err.strerror or err}); "
            "start the cluster with `ray start --head` or check --address"
        ) from None


def _connect(ray, address: str | None) -> None:
    if ray.is_initialized():
        return
    if address:
        _check_reachable(address)
    try:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = f"at {address}" if address else "on this machine"
        hint = ""
        if os.environ.get("RAY_AUTH_MODE") is None:  # `ray start` turns token authentication on by default
            hint = " (if the cluster uses token authentication, set RAY_AUTH_MODE=token here too)"
        raise BatchscopeError(f"executor ray: cannot connect to a Ray cluster {where}: {err}{hint}") from None


def _train_unit(spec_jsons: list[str], run_ids: list[str], snapshot: Snapshot, threads: int, code: dict | None = None):
    """The Ray task: train a unit in a thread of this worker and yield its relayed writes as they come.
    The first yield says where it runs (the worker's provenance); the outcomes come last. `code`: the files of
    the user's own modules its factories import (`pack_modules`)."""
    import ray

    if not ray.get_gpu_ids():  # asked for no GPU: "auto" must not take one another task was given
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.set_num_threads(threads)
    unpack_modules(code or {})
    specs = [RunSpec.model_validate_json(s) for s in spec_jsons]
    out: queue.Queue = queue.Queue()
    end = object()
    try:
        device = str(resolve_device(specs[0].train.device))
    except BatchscopeError:
        device = specs[0].train.device  # the run fails in train_relayed with this error
    yield ("started", run_ids[0], {**provenance(device, specs[0].train.dtype),
                                   "ray_node_id": ray.get_runtime_context().get_node_id()})

    def work() -> None:
        try:
            train_relayed(specs, run_ids, Relay(snapshot, out.put))
        finally:
            out.put(end)

    threading.Thread(target=work, daemon=True, name="batchscope-train").start()
    while (message := out.get()) is not end:
        yield message


@dataclass
class _Unit:
    """Runs submitted together (one, or a fused stack), what is still owed for them, and their attempts."""

    index: int  # of the first run in the sweep, for progress
    specs: list[RunSpec]
    callback: Progress | None = None
    attempts: int = 0
    pending: list[str] = field(default_factory=list)  # run ids without an outcome yet
    resources: dict = field(default_factory=dict)  # num_cpus, num_gpus of its Ray task


class RayExecutor:
    """Units of work as Ray tasks, at most as many at a time as the cluster can run; the driver writes."""

    name = "ray"
    remote = True  # trains on other machines: the driver checks specs on its CPU

    def __init__(self, settings: RaySettings | None = None, reason: str = "asked for") -> None:
        self.settings = settings or RaySettings()
        self.reason = reason
        self._code = None  # the object-store reference of the user's modules the runs' factories import, if any

    def connect(self):
        """Join the cluster (once per process); a one-line error if ray is missing or the cluster is not there.
        Callers connect before they write to the store, so that a wrong address leaves nothing behind."""
        ray = import_ray()
        _connect(ray, self.settings.address)
        return ray

    def run(self, store: Store, runs: Sequence[RunSpec], on_progress: OnRunStart | None = None) -> SweepSummary:
        """Train every run not done or diverged on the cluster; returns what happened to each."""
        ray = self.connect()
        gpus_on_cluster = ray.cluster_resources().get("GPU", 0) > 0
        claims = Claims(store, SweepSummary(total=len(runs), executor=self.name))
        todo = deque(self._units(runs, gpus_on_cluster))
        if not todo:
            return claims.summary
        for unit in todo:
            unit.resources = self._resources(unit.specs[0], gpus_on_cluster)
        refs = {name for r in runs for name in (r.model.name, r.data.name, r.loss.name) if is_factory(name)}
        modules = shippable_modules(sorted(refs))
        self._code = ray.put(pack_modules(modules)) if modules else None  # once: every task refers to it
        shapes = {tuple(sorted(u.resources.items())) for u in todo}
        slots = max(self._slots(ray, dict(shape)) for shape in shapes)  # each shape must fit some node
        task = ray.remote(max_retries=0)(_train_unit)  # retries are the driver's: see the module doc
        inflight: dict[object, _Unit] = {}  # task stream -> its unit
        try:
            while todo or inflight:
                while todo and len(inflight) < slots:
                    if any(s.train.warm_start is not None for s in todo[0].specs) and inflight:
                        break  # its source may still be training: sources come first in a sweep's order
                    unit = todo.popleft()
                    self._claim(claims, unit)
                    if unit.pending:
                        if on_progress is not None:
                            unit.callback = on_progress(unit.index, len(runs), unit.specs[0])
                        inflight[self._submit(store, task, unit)] = unit
                if inflight:
                    ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.2)
                    for stream in ready:
                        self._serve(ray, claims, task, stream, inflight)
        except BaseException:
            for stream in inflight:
                try:
                    ray.cancel(stream, force=True)
                except Exception:  # noqa: BLE001 -- the cluster may be gone: the claims matter more
                    pass
            claims.release()  # the runs in flight: resumed from their last checkpoints next time
            raise
        return claims.summary

    # -- planning -------------------------------------------------------------------------------------

    def _units(self, runs: Sequence[RunSpec], gpus_on_cluster: bool) -> list[_Unit]:
        fuse = self.settings.fuse
        if fuse is None:
            fuse = any(self._wants_gpu(r, gpus_on_cluster) for r in runs)
        units = []
        groups = fused_groups(runs) if fuse else [[i] for i in range(len(runs))]
        for group in groups:
            if len(group) > 1 and unfusable_reason(runs[group[0]]) is None:
                units.append(_Unit(group[0], [runs[i] for i in group]))
            else:
                units.extend(_Unit(i, [runs[i]]) for i in group)
        return sorted(units, key=lambda u: u.index)  # the sweep's order: warm-start sources first

    @staticmethod
    def _wants_gpu(spec: RunSpec, gpus_on_cluster: bool) -> bool:
        device = spec.train.device
        return device.startswith("cuda") or (device == "auto" and gpus_on_cluster)

    def _resources(self, spec: RunSpec, gpus_on_cluster: bool) -> dict:
        gpus = self.settings.gpus_per_run
        if gpus is None:
            gpus = 1.0 if self._wants_gpu(spec, gpus_on_cluster) else 0.0
        return {"num_cpus": self.settings.cpus_per_run, "num_gpus": gpus}

    @staticmethod
    def _slots(ray, resources: dict) -> int:
        """Units the cluster's live nodes can run at once (at least 1); none fits anywhere: a one-line error."""
        cpus, gpus = resources["num_cpus"], resources["num_gpus"]
        slots, seen = 0, []
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            have = node.get("Resources", {})
            c, g = have.get("CPU", 0.0), have.get("GPU", 0.0)
            seen.append(f"{c:g} CPU/{g:g} GPU")
            fits = int(c // cpus)  # cpus > 0: RaySettings checks it
            if gpus:
                fits = min(fits, int(g // gpus))
            slots += fits
        if slots == 0:
            raise BatchscopeError(
                f"executor ray: each run asks for {cpus:g} CPU and {gpus:g} GPU, but no node of the cluster has "
                f"that (nodes: {', '.join(seen) or 'none'}); see --cpus-per-run and --gpus-per-run"
            )
        return slots

    # -- driving --------------------------------------------------------------------------------------

    def _claim(self, claims: Claims, unit: _Unit) -> None:
        # the rest of the provenance (host, pid, device, libraries) is the worker's, sent when it starts
        prov = {"batchscope_version": __version__, "executor": self.name, "ray_address": self.settings.address}
        if len(unit.specs) > 1:
            prov["fused_runs"] = len(unit.specs)
        unit.specs = [spec for spec in unit.specs if claims.claim(spec.run_id(), prov)]
        unit.pending = [s.run_id() for s in unit.specs]

    def _submit(self, store: Store, task, unit: _Unit):
        """Start an attempt at the unit's runs without an outcome, from what the store holds of them."""
        unit.specs = [s for s in unit.specs if s.run_id() in unit.pending]
        unit.attempts += 1
        for run_id in unit.pending:
            # rows from an attempt that died: a fused stack restarts from scratch, a run from its resume point
            if len(unit.pending) > 1 or store.latest_checkpoint(run_id, "resume") is None:
                store.truncate_metrics(run_id, -1)
        snapshot = Snapshot.of(store, unit.specs)
        threads = max(1, int(self.settings.cpus_per_run))
        specs = [s.model_dump_json() for s in unit.specs]
        return task.options(**unit.resources).remote(specs, list(unit.pending), snapshot, threads, self._code)

    def _serve(self, ray, claims: Claims, task, stream, inflight: dict) -> None:
        """Apply the next message of a task's stream; retry or fail its unit if the task died."""
        store, unit = claims.store, inflight[stream]
        try:
            message = ray.get(next(stream))
        except StopIteration:
            del inflight[stream]
            self._fail(claims, unit, "the Ray task ended without an outcome")  # only if the task's code is bad
            return
        except ray.exceptions.RayTaskError as err:  # batchscope's own code raised in the task: would again
            del inflight[stream]
            self._fail(claims, unit, failure_text(err))
            return
        except ray.exceptions.RayError as err:  # the worker, its node or an object died with it
            del inflight[stream]
            if unit.attempts <= self.settings.retries:
                inflight[self._submit(store, task, unit)] = unit
            else:
                tries = f"{unit.attempts} attempt{'s' if unit.attempts > 1 else ''}"
                self._fail(claims, unit, f"Ray worker died on each of {tries}: {type(err).__name__}: {err}")
            return
        if apply_write(store, message):
            return
        kind, run_id, *body = message
        if kind == "started":
            worker = body[0]
            if worker.get("batchscope_version") != __version__:
                ray.cancel(stream, force=True)
                del inflight[stream]
                self._fail(claims, unit, (
                    f"node {worker.get('hostname')} has batchscope {worker.get('batchscope_version')}, the driver "
                    f"{__version__}: install the same version on every node"
                ))
                return
            for rid in unit.pending:
                store.update_provenance(rid, {**worker, "executor": self.name, "ray_attempts": unit.attempts})
        elif kind == "progress":
            if unit.callback is not None:
                unit.callback(*body[0])
        elif kind in ("result", "failed"):
            if kind == "result":
                claims.record(run_id, body[0])
            else:
                claims.fail([run_id], body[0])
            unit.pending.remove(run_id)
            if not unit.pending:
                del inflight[stream]

    @staticmethod
    def _fail(claims: Claims, unit: _Unit, error: str) -> None:
        claims.fail(unit.pending, error)
        unit.pending = []


__all__ = ["RayExecutor", "RaySettings", "import_ray"]
