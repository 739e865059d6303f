"""The run lifecycle (`batchscope.runs.Claims`) that every executor, the data-parallel lead and the studies'
simulations share: each claimed run ends done, failed or released, and is filed once in the summary."""

import pytest

from batchscope.errors import BatchscopeError
from batchscope.runs import Claims
from batchscope.store import Store, provenance

SPEC = {"kind": "test"}


@pytest.fixture
def claims(tmp_path):
    with Store(tmp_path / "runs.db") as st:
        for rid in ("a", "b"):
            st.add_run(rid, {**SPEC, "id": rid})
        yield Claims(st)


def test_an_interrupt_releases_every_held_run_and_goes_on_up(claims):
    prov = provenance("cpu", "float32")
    assert claims.claim("a", prov) and claims.claim("b", prov)
    with pytest.raises(KeyboardInterrupt), claims.training():
        raise KeyboardInterrupt
    assert [claims.store.get_run(r).status for r in "ab"] == ["pending", "pending"]
    assert claims.held == [] and claims.summary.failed == []
    assert claims.claim("a", prov)  # resumed by the next call


def test_an_error_fails_the_held_runs_and_ends_at_the_block(claims):
    assert claims.claim("a", provenance("cpu", "float32"))
    with claims.training() as attempt:
        raise RuntimeError("boom")
    rec = claims.store.get_run("a")
    assert attempt.failed and rec.status == "failed" and claims.summary.failed == ["a"]
    assert rec.error.startswith("RuntimeError: boom\nTraceback (most recent call last):")
    assert "test_an_error_fails" in rec.error.splitlines()[2]  # the traceback starts at the caller's frame


def test_a_batchscope_error_stores_its_message_and_reraise_goes_on_up(claims):
    prov = provenance("cpu", "float32")
    assert claims.claim("a", prov)
    with claims.training() as attempt:
        raise BatchscopeError("data set 'x': no such file")
    assert attempt.failed and claims.store.get_run("a").error == "data set 'x': no such file"
    assert claims.claim("b", prov)
    with pytest.raises(ValueError), claims.training(lambda e: f"short: {e}", reraise=True):
        raise ValueError("bad")
    assert claims.store.get_run("b").error == "short: bad"


def test_finished_or_held_runs_are_skipped(claims):
    prov = provenance("cpu", "float32")
    assert claims.claim("a", prov)
    claims.finish("a", "done", final={"x": 1.0})
    assert not claims.claim("a", prov)  # done: never trained again
    assert claims.claim("b", prov) and not Claims(claims.store).claim("b", prov)  # held by a live process
    assert claims.summary.trained == ["a"] and claims.summary.skipped == ["a"] and claims.held == ["b"]
