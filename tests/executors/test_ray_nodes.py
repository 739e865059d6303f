"""The Ray executor when a whole node dies mid-run: a cluster of two worker nodes on this machine
(`ray.cluster_utils.Cluster`, Ray's own tool for multi-node tests), one of them killed under a run."""

import pytest

from batchscope.store import Store
from test_ray import kill_worker, needs_ray, serial_reference, stored, sweep_with_a_killer, token_auth


@pytest.mark.slow
@needs_ray
def test_a_run_whose_node_dies_is_retried_on_another_and_stored_once(tmp_path):
    with token_auth():
        import ray
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # runs go to the workers
        nodes = {n.node_id: n for n in (cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1))}
        cluster.wait_for_nodes()
        try:
            ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)

            def remove_node(rec) -> str:
                """The machine goes: every process of the node at once, the worker on it included (left alone,
                a worker whose raylet died can finish its task before it notices, and the run needs no retry)."""
                node_id = rec.provenance["ray_node_id"]
                kill_worker(rec)
                cluster.remove_node(nodes[node_id], allow_graceful=False)
                return node_id

            path = tmp_path / "ray.db"
            with Store(path) as st:
                sweep, target, summary, killer = sweep_with_a_killer(st, cluster.address, kill=remove_node)
                assert [a for a, _ in killer.killed] == [1], "the node was not removed mid-run"
                assert len(summary.trained) == 4 and not summary.failed
                rec = st.get_run(target)
                assert rec.provenance["ray_attempts"] == 2
                assert rec.provenance["ray_node_id"] != killer.killed[0][1]  # trained on the node left
        finally:
            ray.shutdown()
            cluster.shutdown()
    assert stored(path) == serial_reference(tmp_path, sweep)
