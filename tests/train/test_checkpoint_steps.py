"""Checkpoints after given updates (log.checkpoint_steps) and warm starts from them (train.warm_start.step)."""

import pytest
import torch

from batchscope.errors import BatchscopeError, SpecError
from batchscope.runs import run_one
from batchscope.spec import validate_run
from batchscope.store import Store

BODY = {"data": {"name": "mnist1d", "n_train": 200, "n_test": 50}, "model": {"name": "mlp", "width": 0.1, "depth": 1},
        "optim": {"lr": 0.05}, "train": {"batch_size": 20, "epochs": 1}, "log": {"log_points": 0}}


def test_step_checkpoints_are_the_weights_after_those_updates(tmp_path):
    with Store(tmp_path / "s.db") as st:
        src = validate_run({**BODY, "log": {"log_points": 0, "checkpoint_steps": [3, 7]}})
        st.add_run(src.run_id(), src.model_dump(mode="json"))
        assert run_one(st, src) == "done"
        tags = dict(st.checkpoints(src.run_id()))
        assert tags["step_3"] == 3 and tags["step_7"] == 7
        # the same run stopped after 3 updates ends with the same weights as step_3
        short = validate_run({**BODY, "train": {"batch_size": 20, "epochs": None, "steps": 3}})
        st.add_run(short.run_id(), short.model_dump(mode="json"))
        run_one(st, short)
        a = st.load_checkpoint(src.run_id(), "step_3")["model"]
        b = st.load_checkpoint(short.run_id(), "final")["model"]
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
        # a warm start from step 7 begins with those weights
        body = src.model_dump(mode="python")
        body["train"]["batch_size"] = 40
        body["log"]["checkpoint_steps"] = []
        body["train"]["warm_start"] = {"source": {"train.batch_size": 20, "log.checkpoint_steps": [3, 7]}, "step": 7}
        branch = validate_run(body)
        assert branch.source_spec().run_id() == src.run_id()
        st.add_run(branch.run_id(), branch.model_dump(mode="json"))
        assert run_one(st, branch) == "done"
        init = st.load_checkpoint(branch.run_id(), "init")["model"]
        for k, v in st.load_checkpoint(src.run_id(), "step_7")["model"].items():
            torch.testing.assert_close(init[k], v, rtol=0, atol=0)
        # a step the source did not keep: one line naming the field
        body["train"]["warm_start"]["step"] = 5
        missing = validate_run(body)
        st.add_run(missing.run_id(), missing.model_dump(mode="json"))
        with pytest.raises(BatchscopeError, match="no checkpoint at step 5; add 5 to log.checkpoint_steps"):
            from batchscope.train.plain import train_run

            train_run(missing, st, missing.run_id())


def test_a_warm_start_names_one_point():
    for ws in ({"source": {}}, {"source": {}, "epoch": 1, "step": 3}):
        with pytest.raises(SpecError, match="exactly one of epoch and step"):
            validate_run({**BODY, "train": {"batch_size": 20, "epochs": 1, "warm_start": ws}})
