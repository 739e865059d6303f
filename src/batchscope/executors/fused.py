"""Groups of runs trained as one vmapped stack (`batchscope.train.fused`): the executor for GPUs.

Runs are grouped by `group_key` (architecture, data, batch size, ...), in the order of the grid, and a
group trains in stacks of at most `max_group` runs. A run that cannot be fused (probes, a group of one, or
a resume checkpoint left by an interrupted serial attempt) goes through `run_one` instead.
On resume, a stack interrupted midway restarts from scratch (fused training writes no resume
checkpoints; its runs' partial metrics are dropped at the new claim), but done runs are never retrained.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..factories import resolve_device
from ..runs import Claims, OnRunStart, SweepSummary, is_finished, run_one
from ..spec import RunSpec
from ..store import Store, provenance
from ..train.fused import group_key, train_group, unfusable_reason


def fused_groups(runs: Sequence[RunSpec]) -> list[list[int]]:
    """Indices of `runs` grouped by `group_key`, groups in order of their first run."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(runs):
        groups.setdefault(group_key(r), []).append(i)
    return list(groups.values())


class FusedExecutor:
    """Each group of fusable runs in vmapped stacks of up to `max_group` runs; the rest serially."""

    name = "fused"
    remote = False

    def __init__(self, reason: str = "asked for", max_group: int = 64) -> None:
        self.reason, self.max_group = reason, max_group

    def run(self, store: Store, runs: Sequence[RunSpec], on_progress: OnRunStart | None = None) -> SweepSummary:
        """Train every run not done or diverged; returns what happened to each."""
        summary = SweepSummary(total=len(runs), executor=self.name)
        claims = Claims(store, summary)
        for group in fused_groups(runs):
            pending = []
            for i in group:
                if is_finished(store, runs[i].run_id()):
                    summary.skipped.append(runs[i].run_id())
                else:
                    pending.append(i)
            fusable = len(pending) >= 2 and unfusable_reason(runs[pending[0]]) is None
            # an interrupted serial attempt resumes from its checkpoint rather than restart in a stack
            serial = [i for i in pending if not fusable or store.latest_checkpoint(runs[i].run_id(), "resume")]
            stacked = [i for i in pending if i not in serial]
            for start in range(0, len(stacked), self.max_group):
                self._train_stack(claims, runs, stacked[start : start + self.max_group], on_progress)
            for i in serial:
                progress = on_progress(i, len(runs), runs[i]) if on_progress else None
                summary.add(runs[i].run_id(), run_one(store, runs[i], progress))
        return summary

    def _train_stack(
        self, claims: Claims, runs: Sequence[RunSpec], idx: list[int], on_progress: OnRunStart | None
    ) -> None:
        """Claim what is claimable of one stack, train it, and store each run's outcome."""
        spec0 = runs[idx[0]]
        prov = {**provenance(str(resolve_device(spec0.train.device)), spec0.train.dtype), "executor": self.name}
        claimed = []
        for i in idx:
            if claims.claim(runs[i].run_id(), {**prov, "fused_runs": len(idx)}):
                claims.store.truncate_metrics(runs[i].run_id(), -1)  # rows of an interrupted stack: logged anew
                claimed.append(i)
        if not claimed:
            return
        ids = [runs[i].run_id() for i in claimed]
        progress = on_progress(claimed[0], len(runs), runs[claimed[0]]) if on_progress else None
        with claims.training() as attempt:  # interrupted: the stack restarts on the next call
            results = train_group([runs[i] for i in claimed], claims.store, ids, progress)
        if not attempt.failed:  # a failure failed the whole stack, not the sweep
            for run_id, result in zip(ids, results):
                claims.record(run_id, result)
