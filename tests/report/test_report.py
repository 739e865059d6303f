"""batchscope.report: claims.json round trip, figures with seed error bars, one self-contained HTML page."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from batchscope.report import (
    Claim,
    errorbar_points,
    line_with_band,
    log_ticks,
    new_figure,
    plain_log,
    read_claims,
    save,
    write_claims,
    write_report,
)
from batchscope.report.claims import Magnitude
from batchscope.stats import RegimeCheck, all_of, equivalence, paired_difference, summarize, trend

PNG = b"\x89PNG\r\n\x1a\n"
META = {"study": "keskar", "scale": "quick", "seeds": [0, 1, 2, 3, 4], "data": "mnist1d"}


def _claims() -> list[Claim]:
    rng = np.random.default_rng(0)
    sb, lb = rng.normal(0.9, 0.01, 5), rng.normal(0.85, 0.01, 5)
    gap = paired_difference(sb, lb, direction="greater", names=("SB", "LB"), excluded=1)
    same = equivalence(sb, sb + rng.normal(0, 0.3, 5), margin=0.01)
    x = np.log([32, 64, 128])
    return [
        Claim("gap", "LB reaches lower test accuracy than SB <script>alert(1)</script> & more", gap,
              {"test_acc_SB": summarize(sb), "test_acc_LB": summarize(lb), "per_seed": sb, "note": "<b>x</b>"},
              figure="accuracy_vs_batch"),
        Claim("same", "Scaling batch and learning rate together leaves accuracy unchanged.", same),
        Claim("trend", "Accuracy falls with batch size.", trend(x, -x + rng.normal(0, 0.01, (4, 3)), direction="decreasing")),
        Claim("every_batch", "At every batch size.", all_of({"B=32": gap, "B=64": same})),
        Claim("gated", "LB is sharper than SB.", gap,
              regime=[RegimeCheck("at_minimum", "loss stopped improving; |grad| < 1e-2 |grad_0|", False, {"grad_ratio": 0.3}),
                      RegimeCheck("fitted", "both reach 99% train accuracy", True, {"train_acc_LB": 0.995})],
              magnitude=[Magnitude("sharpness ratio LB/SB", 1.3, (17.0, 167.0), "Table 3, F1", ci=(1.1, 1.5))]),
        Claim("own_check", "A precondition the project adds.", gap, own=True,
              magnitude=Magnitude("gap in points", 5.1, 0.22, "Table 2, F1")),
    ]


def _figure(tmp_path):
    fig, ax = new_figure()
    rng = np.random.default_rng(1)
    sizes = [32, 64, 128, 256]
    grid = 0.9 - 0.01 * np.log(sizes) + rng.normal(0, 0.01, (5, 4))
    grid[0, 3] = np.nan
    s = errorbar_points(ax, sizes, grid, "test acc")
    assert s.n.tolist() == [5, 5, 5, 4]
    line_with_band(ax, sizes, grid, "band", band="sem")
    assert sorted(ax.get_legend_handles_labels()[1]) == ["band (n=4-5)", "test acc (n=4-5)"]
    log_ticks(ax, sizes)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["32", "64", "128", "256"]
    return save(fig, tmp_path / "src_figs", "accuracy_vs_batch")


def test_plain_log_labels_measured_values_plainly_without_minor_labels():
    fig, ax = new_figure()
    ax.plot([0.27, 1.6, 3.2, 5.0], [0.59, 0.63, 0.64, 0.64], marker="o")
    plain_log(ax)
    fig.canvas.draw()
    shown = [t.get_text() for t in ax.get_xticklabels() if t.get_text() and 0.27 <= t.get_position()[0] <= 5.0]
    assert shown == ["0.5", "1", "2", "5"]
    assert not any(t.get_text() for t in ax.get_xticklabels(minor=True))
    assert ax.get_xscale() == "log"


def test_figures_save_png(tmp_path):
    path = _figure(tmp_path)
    assert path.name == "accuracy_vs_batch.png" and path.read_bytes().startswith(PNG)
    fig, axes = new_figure(1, 2)
    assert axes.shape == (1, 2)
    with pytest.raises(ValueError, match="figure name"):
        save(fig, tmp_path, "../escape")
    with pytest.raises(ValueError, match="seeds x len"):
        line_with_band(axes[0, 0], [1, 2, 3], np.zeros((2, 4)))


def test_claims_json_round_trip(tmp_path):
    claims = _claims()
    path = write_claims(tmp_path / "claims.json", claims, META)
    doc = json.loads(path.read_text())  # strict JSON: NaN would not parse back as a number
    assert "NaN" not in path.read_text()
    assert doc["study"] == "keskar" and doc["scale"] == "quick" and doc["batchscope_version"]
    assert doc["created"] and doc["meta"]["seeds"] == [0, 1, 2, 3, 4]
    assert sum(doc["counts"].values()) == len(claims)
    head, back = read_claims(path)
    assert head["study"] == "keskar"
    assert [c.id for c in back] == [c.id for c in claims]
    for orig, got in zip(claims, back):
        assert got.verdict.verdict == orig.verdict.verdict
        assert got.verdict.to_dict() == orig.verdict.to_dict()
        assert got.to_dict() == orig.to_dict()
    assert doc["claims"][0]["verdict"]["n_excluded"] == 1
    assert doc["claims"][0]["measured"]["test_acc_SB"]["n"] == 5
    # a failed regime check made the verdict untested; the checks are listed once with their claims
    gated = next(c for c in doc["claims"] if c["id"] == "gated")
    assert gated["verdict"]["verdict"] == "untested" and gated["verdict"]["details"]["verdict_if_tested"] == "holds"
    assert gated["magnitude"][0]["published"] == [17.0, 167.0] and gated["magnitude"][0]["measured"] == 1.3
    assert {r["id"]: (r["passed"], r["claims"]) for r in doc["regime"]} == {
        "at_minimum": (False, ["gated"]), "fitted": (True, ["gated"])}
    assert doc["counts"]["untested"] == 1
    assert next(c for c in doc["claims"] if c["id"] == "own_check")["own"] is True


def test_claims_refuse_hand_written_verdicts_and_bad_meta(tmp_path):
    with pytest.raises(TypeError, match="Verdict"):
        Claim("x", "statement", "holds")  # type: ignore[arg-type]
    claims = _claims()
    with pytest.raises(ValueError, match="scale"):
        write_claims(tmp_path / "c.json", claims, {"study": "keskar"})
    with pytest.raises(ValueError, match="duplicate"):
        write_claims(tmp_path / "c.json", claims + claims[:1], META)
    assert not (tmp_path / "c.json").exists()


def test_report_is_self_contained_and_escaped(tmp_path):
    fig_path = _figure(tmp_path)
    claims = _claims()
    out = tmp_path / "report"
    index = write_report(
        out,
        title="Keskar et al. <2017>",
        summary="First paragraph with <i>markup</i>.\n\nSecond paragraph.",
        claims=claims,
        figures=[("accuracy_vs_batch", fig_path, "Test accuracy, mean ± sd over seeds")],
        tables=[("Final metrics", ["batch", "acc"], [["32", 0.91234567], ["64", float("nan")]])],
        meta=META,
    )
    page = index.read_text(encoding="utf-8")
    assert index == out / "index.html"
    assert (out / "figures" / "accuracy_vs_batch.png").read_bytes() == fig_path.read_bytes()
    assert "data:image/png;base64," in page
    # offline: nothing is fetched from anywhere, no scripts
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<link" not in page and "<script" not in page and "@import" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page
    assert "&lt;i&gt;markup&lt;/i&gt;" in page and "Keskar et al. &lt;2017&gt;" in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page
    # each verdict with its badge, its rule and its numbers
    for c in claims:
        assert f'id="claim-{c.id}"' in page
    assert page.count('class="badge holds"') >= 1 and 'class="badge inconclusive"' in page
    assert "paired t over seeds" in page and "±0.01" in page
    assert 'href="#fig-accuracy_vs_batch"' in page and 'id="fig-accuracy_vs_batch"' in page
    assert "0.9123" in page
    # claims.json sits beside the page and agrees with it
    doc = json.loads((out / "claims.json").read_text())
    assert [c["verdict"]["verdict"] for c in doc["claims"]] == [c.verdict.verdict for c in claims]
    assert doc["created"] in page and "mnist1d" in page
    # regime checks come first, before the summary and the claims; magnitudes beside the paper's
    assert page.index('id="regime"') < page.index("<h2>Summary</h2>") < page.index("<h2>Claims</h2>")
    assert "Regime checks (1 of 2 passed)" in page and "not reached" in page
    assert 'class="badge untested"' in page and "the data alone would say holds" in page
    assert "sharpness ratio LB/SB: measured" in page and "17 to 167" in page and "Table 3, F1" in page
    assert "project's own" in page


def test_report_checks_before_writing(tmp_path):
    claims = _claims()
    out = tmp_path / "report"
    with pytest.raises(ValueError, match="accuracy_vs_batch"):
        write_report(out, title="t", summary="s", claims=claims, figures=[], meta=META)
    not_png = tmp_path / "fake.png"
    not_png.write_text("hello")
    with pytest.raises(ValueError, match="not a PNG"):
        write_report(out, title="t", summary="s", claims=claims[1:], figures=[("f", not_png, "c")], meta=META)
    fig_path = _figure(tmp_path)
    with pytest.raises(ValueError, match="row 0"):
        write_report(out, title="t", summary="s", claims=claims, figures=[("accuracy_vs_batch", fig_path, "c")],
                     tables=[("bad", ["a", "b"], [["1"]])], meta=META)
    assert not out.exists() or not any(out.rglob("*"))
