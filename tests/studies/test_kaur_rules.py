"""Kaur et al. 2023: every claim's rule and every regime check, decided from made-up numbers (no training).

For every claim: the effect present gives `holds`; absent and reversed give anything but `holds`. For every
regime check: passing and failing inputs, and a failed check gives `untested`.
"""

import math

import pytest

from batchscope.stats import paired_difference
from batchscope.studies import Options
from batchscope.studies.kaur import CellNumbers, Kaur, decide, key, not_everywhere

C = Kaur().config(Options(scale="quick"))
GRIDS = Kaur().cells(C)
SEEDS = range(5)
LO, HI = min(C.lrs), max(C.lrs)
B0, B1 = min(C.batches), max(C.batches)
PMAX = max(C.dropouts)


def _noise(cell, s: int) -> float:
    """A small deterministic spread over seeds, in [-1, 1]."""
    return (((s * 37 + len(cell.label) * 11 + int(1000 * cell.lr)) % 7) - 3) / 3


def _bn(cell) -> bool:
    return cell.model.get("norm", "none") == "batch"


def _p(cell) -> float:
    return cell.model.get("dropout", 0.0)


# -- a world where every finding of the paper is present ------------------------------------------------
def lam_paper(cell, s):
    """SGD: lambda_max ~ 1.5 / eta (below 2/eta); SAM 0.6x; dropout exp(-3p); BN 1.5x at the smallest eta and
    0.5x elsewhere; GD at the edge of stability (1.05 x 2/eta)."""
    if cell.grid == "gd":
        v = 1.05 * 2.0 / cell.lr
    elif cell.grid == "dropout":
        v = 10.0 * math.exp(-3 * _p(cell))
    else:
        v = 1.5 / cell.lr * (cell.batch / 128) ** 0.1
        if cell.rho > 0:
            v *= 0.6
        if _bn(cell):
            v *= 1.5 if math.isclose(cell.lr, min(C.bn_lrs)) else 0.5
    return v * math.exp(0.03 * _noise(cell, s))


def acc_paper(cell, s):
    """The larger eta and SAM help at the smallest batch only; scaling B and eta changes nothing; the largest p loses
    5 points; BN adds 5 points; GD sits 5 points below SGD."""
    e = 0.002 * _noise(cell, s)
    if cell.grid == "gd":
        return 0.50 + e
    if cell.grid == "dropout":
        return (0.95 + 0.01 * (0 < _p(cell) < PMAX) - 0.05 * (_p(cell) == PMAX)) + e
    a = 0.60
    if cell.batch == B0:
        a += 0.06 * math.log(cell.lr / LO) / math.log(HI / LO)
        if cell.rho > 0:
            a += 0.04
    if _bn(cell):
        a += 0.05
    return a + e


def numbers(lam=lam_paper, acc=acc_paper, why=lambda cell, s: None, seeds=SEEDS):
    out = {}
    for cells in GRIDS.values():
        for cell in cells:
            n = CellNumbers({}, {}, {}, {})
            for s in seeds:
                w = why(cell, s)
                n.why[s] = w
                n.lam[s] = lam(cell, s) if w is None else math.nan
                n.acc[s] = acc(cell, s) if w is None else math.nan
                n.epochs[s] = 100.0
            out[key(cell)] = n
    return out


def claims(**kw):
    return {c.id: c for c in decide(C, GRIDS, numbers(**kw))}


def verdicts(**kw):
    return {cid: c.verdict.verdict for cid, c in claims(**kw).items()}


def test_every_claim_holds_where_the_paper_is_right_and_every_check_passes():
    cs = claims()
    assert {cid: c.verdict.verdict for cid, c in cs.items()} == {
        "lr_batch": "holds", "lr_benefit": "holds", "scaled": "holds", "sam": "holds", "dropout": "holds",
        "batch_norm": "holds", "gd_vs_sgd": "holds", "gd_edge_of_stability": "holds"}
    for c in cs.values():
        assert c.regime and all(r.passed for r in c.regime)
        assert c.magnitude and all(m.measured is not None for m in c.magnitude)
    assert [cid for cid, c in cs.items() if c.own] == ["gd_edge_of_stability"]
    assert "own claim" in cs["gd_edge_of_stability"].statement
    # magnitudes in the paper's units: lambda_max ratios and accuracy points
    mag = {m.quantity: m.measured for m in cs["lr_batch"].magnitude}
    assert mag[f"lambda_max(eta {LO:g}) / lambda_max(eta {HI:g}), B={B0}"] == pytest.approx(HI / LO, rel=0.1)
    mag = {m.quantity: m.measured for m in cs["dropout"].magnitude}
    assert mag[f"test accuracy, p {PMAX:g} minus p 0 (points)"] == pytest.approx(-5, abs=0.5)


# -- lr_batch: larger eta lowers lambda_max at every batch size ----------------------------------------------
def _lr_free(cell, s):
    return lam_paper(cell, s) * (cell.lr if cell.grid == "lr_batch" else 1.0)


def test_lr_batch_absent_and_reversed():
    assert verdicts(lam=_lr_free)["lr_batch"] != "holds"
    assert verdicts(lam=lambda cell, s: _lr_free(cell, s) * (cell.lr if cell.grid == "lr_batch" else 1))["lr_batch"] == "fails"
    # at one batch size only: "every batch size" is not met
    one = lambda cell, s: _lr_free(cell, s) if cell.grid == "lr_batch" and cell.batch == B1 else lam_paper(cell, s)  # noqa: E731
    assert verdicts(lam=one)["lr_batch"] != "holds"


def test_lr_batch_too_small_a_fall_is_not_the_paper_s():
    # a 10% fall (under the 1.25 ratio stated in advance) does not hold, however precise
    small = lambda cell, s: _lr_free(cell, s) * (1.1 if cell.grid == "lr_batch" and cell.lr == LO else 1)  # noqa: E731
    assert verdicts(lam=small)["lr_batch"] == "fails"


# -- lr_benefit: larger eta generalizes better at the smallest batch; its vanishing is shown, not judged ------
def test_lr_benefit_absent_reversed_and_vanishing_not_required():
    flat = lambda cell, s: 0.6 + 0.002 * _noise(cell, s) if cell.grid == "lr_batch" else acc_paper(cell, s)  # noqa: E731
    assert verdicts(acc=flat)["lr_benefit"] != "holds"
    rev = lambda cell, s: (flat(cell, s) - (0.05 if cell.grid == "lr_batch" and cell.lr == HI else 0))  # noqa: E731
    assert verdicts(acc=rev)["lr_benefit"] == "fails"
    # the benefit persisting at every batch size does not refute the paper ("sometimes vanishes")
    everywhere = lambda cell, s: (acc_paper(cell, s) + (0.06 if cell.grid == "lr_batch" and cell.batch != B0  # noqa: E731
                                                        and cell.lr == HI else 0))
    c = claims(acc=everywhere)["lr_benefit"]
    assert c.verdict.verdict == "holds"
    assert c.measured["benefit_by_batch"][f"B={B1}"]["estimate"] == pytest.approx(0.06, abs=0.005)


# -- scaled: lambda_max changes along eta / B fixed, generalization does not ---------------------------------
def test_scaled_absent_and_reversed():
    same = lambda cell, s: 20.0 * math.exp(0.03 * _noise(cell, s)) if cell.grid == "scaled" else lam_paper(cell, s)  # noqa: E731
    assert verdicts(lam=same)["scaled"] != "holds"
    rises = lambda cell, s: cell.lr * 100 * math.exp(0.03 * _noise(cell, s)) if cell.grid == "scaled" else lam_paper(cell, s)  # noqa: E731
    assert verdicts(lam=rises)["scaled"] == "fails"
    # generalization changes along the diagonal (5 points): not "without changing generalization"
    moves = lambda cell, s: acc_paper(cell, s) + (0.05 * math.log(cell.batch / B0) if cell.grid == "scaled" else 0)  # noqa: E731
    assert verdicts(acc=moves)["scaled"] == "fails"


# -- sam ------------------------------------------------------------------------------------------------------
def test_sam_absent_and_reversed():
    no_sam = lambda cell, s: lam_paper(cell, s) / (0.6 if cell.rho > 0 else 1)  # noqa: E731
    assert verdicts(lam=no_sam)["sam"] != "holds"
    assert verdicts(lam=lambda cell, s: no_sam(cell, s) * (1.6 if cell.rho > 0 else 1))["sam"] == "fails"
    # benefit persisting at the largest batch: not "vanishes"
    keeps = lambda cell, s: acc_paper(cell, s) + (0.04 if cell.grid == "sam" and cell.rho > 0 and cell.batch == B1 else 0)  # noqa: E731
    assert verdicts(acc=keeps)["sam"] == "fails"
    hurts = lambda cell, s: acc_paper(cell, s) - (0.08 if cell.rho > 0 else 0)  # noqa: E731
    assert verdicts(acc=hurts)["sam"] == "fails"


# -- dropout: excessive p lowers lambda_max and hurts generalization --------------------------------------------
def test_dropout_absent_and_reversed():
    flat = lambda cell, s: 10.0 * math.exp(0.03 * _noise(cell, s)) if cell.grid == "dropout" else lam_paper(cell, s)  # noqa: E731
    assert verdicts(lam=flat)["dropout"] != "holds"
    rises = lambda cell, s: (  # noqa: E731
        10.0 * math.exp(3 * _p(cell) + 0.03 * _noise(cell, s)) if cell.grid == "dropout" else lam_paper(cell, s)
    )
    assert verdicts(lam=rises)["dropout"] == "fails"


def test_dropout_regime_the_grid_must_reach_a_harmful_p():
    # p = 0.9 no worse than p = 0: the grid never reaches "excessive" dropout, so the claim is untested, not failed
    mild = lambda cell, s: acc_paper(cell, s) + (0.06 if cell.grid == "dropout" and _p(cell) == PMAX else 0)  # noqa: E731
    c = claims(acc=mild)["dropout"]
    check = {r.id: r for r in c.regime}["dropout_reaches_harmful_p"]
    assert not check.passed and check.measured["acc_difference_points"] == pytest.approx(1, abs=0.5)
    assert c.verdict.verdict == "untested" and "verdict_if_tested" in c.verdict.details
    assert {r.id: r for r in claims()["dropout"].regime}["dropout_reaches_harmful_p"].passed


# -- batch norm: not consistently lower lambda_max, but better generalization ----------------------------------
def test_batch_norm_refuted_only_if_lower_at_every_lr():
    lower_everywhere = lambda cell, s: lam_paper(cell, s) * (1 / 3 if _bn(cell) and cell.lr == min(C.bn_lrs) else 1)  # noqa: E731
    assert verdicts(lam=lower_everywhere)["batch_norm"] == "fails"
    # BN higher at every eta, or lower at all but one: the paper's "not consistently" holds
    higher = lambda cell, s: lam_paper(cell, s) * (4 if _bn(cell) and cell.lr != min(C.bn_lrs) else 1)  # noqa: E731
    assert verdicts(lam=higher)["batch_norm"] == "holds"
    assert verdicts()["batch_norm"] == "holds"


def test_batch_norm_benefit_absent_and_reversed():
    none = lambda cell, s: acc_paper(cell, s) - (0.05 if _bn(cell) else 0)  # noqa: E731
    assert verdicts(acc=none)["batch_norm"] != "holds"
    assert verdicts(acc=lambda cell, s: none(cell, s) - (0.05 if _bn(cell) else 0))["batch_norm"] == "fails"


def test_not_everywhere_is_the_negation_of_all_of():
    yes = paired_difference([1, 2, 3, 4], [0, 0, 0, 0.5], direction="greater")
    no = paired_difference([0, 0, 0, 0.5], [1, 2, 3, 4], direction="greater")
    unsure = paired_difference([1, -1, 1, -1], [0, 0, 0, 0], direction="greater")
    assert yes.verdict == "holds" and no.verdict == "fails" and unsure.verdict == "inconclusive"
    assert not_everywhere({"a": yes, "b": yes}, "x").verdict == "fails"
    assert not_everywhere({"a": yes, "b": no}, "x").verdict == "holds"
    assert not_everywhere({"a": yes, "b": unsure}, "x").verdict == "inconclusive"


# -- GD against SGD ----------------------------------------------------------------------------------------------
def _on_relation(cell, s):
    """GD's accuracy where SGD's lambda_max relation puts it (no discrepancy): the mean SGD accuracy."""
    return 0.60 + 0.06 / 3 if cell.grid == "gd" else acc_paper(cell, s)


def test_gd_vs_sgd_absent_and_reversed():
    # SGD accuracy rises by 6 points over one of three batch sizes: the relation is flat-ish near 0.62
    assert verdicts(acc=_on_relation)["gd_vs_sgd"] != "holds"
    above = lambda cell, s: _on_relation(cell, s) + (0.10 if cell.grid == "gd" else 0)  # noqa: E731
    assert verdicts(acc=above)["gd_vs_sgd"] == "fails"


def test_gd_vs_sgd_regime_gd_lambda_within_sgd_range():
    far = lambda cell, s: lam_paper(cell, s) / (100 if cell.grid == "gd" else 1)  # noqa: E731
    c = claims(lam=far)["gd_vs_sgd"]
    assert not {r.id: r for r in c.regime}["gd_lambda_within_sgd_range"].passed
    assert c.verdict.verdict == "untested"
    assert claims(lam=far)["gd_edge_of_stability"].verdict.verdict == "fails"  # own claim, no such regime


def test_gd_edge_of_stability_is_own_and_can_fail():
    below = lambda cell, s: lam_paper(cell, s) * (0.5 if cell.grid == "gd" else 1)  # noqa: E731
    assert verdicts(lam=below)["gd_edge_of_stability"] == "fails"
    above = lambda cell, s: lam_paper(cell, s) * (3 if cell.grid == "gd" else 1)  # noqa: E731
    assert verdicts(lam=above)["gd_edge_of_stability"] == "fails"
    off = lambda cell, s: lam_paper(cell, s) * (0.7 if cell.grid == "gd" else 1)  # noqa: E731
    assert verdicts(lam=off) == {**verdicts(), "gd_edge_of_stability": "fails"}  # not part of Kaur et al.'s claims


# -- fitting: runs that miss 99% training accuracy are counted with their reason ----------------------------------
def test_fit_regime_fails_when_a_cell_has_too_few_fitted_runs():
    bad = lambda cell, s: (  # noqa: E731
        "missed the fitting criterion" if cell.grid == "lr_batch" and cell.lr == HI and cell.batch == B0 and s < 3 else None
    )
    cs = claims(why=bad)
    check = {r.id: r for r in cs["lr_batch"].regime}["fit_lr_batch"]
    assert not check.passed and check.measured["cells_short"] == [f"B={B0}, eta={HI:g}"]
    assert check.measured["excluded"] == {"missed the fitting criterion": 3}
    assert cs["lr_batch"].verdict.verdict == "untested" and cs["lr_benefit"].verdict.verdict == "untested"
    assert cs["gd_vs_sgd"].verdict.verdict == "untested"
    assert cs["sam"].verdict.verdict == "holds"  # another grid: its own check passes


def test_excluded_runs_counted_once_with_reasons():
    why = lambda cell, s: ("diverged" if cell.grid == "dropout" and _p(cell) == PMAX and s == 0 else  # noqa: E731
                           "failed" if cell.grid == "dropout" and _p(cell) == 0 and s == 1 else None)
    c = claims(why=why)["dropout"]
    assert all(r.passed for r in c.regime)  # 18 of 20 fitted, every cell >= 3
    assert c.verdict.n_excluded == 2
    assert c.verdict.details["excluded_reasons"] == {"diverged": 1, "failed": 1}
    assert c.verdict.verdict == "holds"


def test_fit_share_threshold():
    # one run short in every cell of the dropout grid: 4 of 5 each, 80% of the grid: passes; two short: fails
    one = lambda cell, s: "missed the fitting criterion" if cell.grid == "dropout" and s == 0 else None  # noqa: E731
    two = lambda cell, s: "missed the fitting criterion" if cell.grid == "dropout" and s < 2 else None  # noqa: E731
    assert {r.id: r for r in claims(why=one)["dropout"].regime}["fit_dropout"].passed
    c = claims(why=two)["dropout"]
    assert not {r.id: r for r in c.regime}["fit_dropout"].passed and c.verdict.verdict == "untested"
