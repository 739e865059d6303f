"""The run store: runs, their status, provenance, metric trajectories and checkpoints, in one SQLite file.

Layout: ``<name>.db`` holds every record; checkpoints are files under ``<name>_artifacts/<run_id>/<tag>.pt``
beside it, recorded in the database with paths relative to that folder (so the pair can be moved together).

Guarantees:

* Every write is one transaction, started with ``BEGIN IMMEDIATE`` so that writers queue on SQLite's
  lock (``busy_timeout``) instead of failing when a read would upgrade to a write; the database runs in
  WAL mode so readers never block writers. A crash or Ctrl-C at any point leaves the last committed state.
* ``claim`` is the only way a run becomes ``running`` and is atomic across processes, so a sweep run
  twice trains nothing twice, and two workers never train the same run.
* Checkpoints are written to a temporary file in the same folder, fsynced, then ``os.replace``-d over the
  old one, so a failed save leaves the previous checkpoint intact.
* Metrics are keyed by ``(run_id, step, name)``; logging a step again replaces it, so a run resumed from a
  checkpoint can replay steps without duplicating rows.

Processes on one machine may share a file (a process pool; a single writing driver). SQLite's WAL mode does
not work over network file systems: do not share one store between machines at the same time.

Modules, one job each: ``db`` (the SQLite file: schema, connections, transactions), ``records`` (runs and
their metrics), ``checkpoints`` (checkpoint files), ``leases`` (claims, and when one is stale), ``export``
(CSV/Parquet), ``runstore`` (``Store``, assembled from them) and ``protocol`` (what a training loop needs
of a store: ``RunStore``, which ``Store`` and the executors' ``Relay`` implement).
"""

from batchscope.provenance import provenance

from .db import SCHEMA_VERSION
from .leases import DEFAULT_LEASE
from .protocol import RunReader, RunStore
from .records import FINAL_STATUSES, STATUSES, RunRecord
from .runstore import Store

__all__ = [
    "STATUSES", "FINAL_STATUSES", "SCHEMA_VERSION", "DEFAULT_LEASE", "RunRecord", "Store",
    "RunReader", "RunStore", "provenance",
]
