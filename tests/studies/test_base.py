"""The helpers the studies share (studies/base.py): one rule each for exclusions, magnitudes, fits and NaNs,
and the typed configs' scale dispatch."""

import math
from dataclasses import FrozenInstanceError, dataclass

import numpy as np
import pytest

from batchscope.stats import Verdict
from batchscope.studies import STUDIES, Options
from batchscope.studies.base import (
    ScaledConfig,
    ci_of,
    count_reasons,
    fit_line,
    log_or_nan,
    magnitude,
    merge_counts,
    percent_points,
    seed_grid,
    slope_line,
)


def _verdict(estimate, ci):
    return Verdict("holds", "rule", "test", estimate, ci, 5, 0, 0.95, {})


def test_reasons_are_counted_in_the_order_they_first_appear():
    assert count_reasons(["failed", None, "diverged", "failed", None]) == {"failed": 2, "diverged": 1}
    assert list(count_reasons(["b", "a", "b"])) == ["b", "a"]
    assert merge_counts({"failed": 1}, {}, {"diverged": 2, "failed": 3}) == {"failed": 4, "diverged": 2}


def test_magnitude_scales_estimate_and_ci_and_drops_what_is_not_finite():
    m = magnitude("q", _verdict(0.02, (0.01, 0.03)), 1.5, "src", percent_points)
    assert (m.measured, m.ci, m.published, m.source) == (pytest.approx(2.0), pytest.approx((1.0, 3.0)), 1.5, "src")
    # a decreasing scale keeps the CI in order
    m = magnitude("q", _verdict(math.log(2), (math.log(1.5), math.log(3))), scale=lambda x: math.exp(-x))
    assert m.measured == pytest.approx(0.5) and m.ci == pytest.approx((1 / 3, 1 / 1.5))
    # one run: an estimate without a CI
    m = magnitude("q", _verdict(0.3, (math.nan, math.nan)), scale=math.exp)
    assert m.measured == pytest.approx(math.exp(0.3)) and m.ci is None
    assert magnitude("q", _verdict(None, (math.nan, math.nan))).measured is None
    assert ci_of(_verdict(1.0, (0.5, 1.5))) == (0.5, 1.5)


def test_fit_line_and_slope_line():
    x = np.array([0.0, 1.0, 2.0, 3.0])
    y = 2.0 * x + 1.0 + np.array([0.1, -0.1, -0.1, 0.1])
    b, a, rss = fit_line(x, y)
    pb, pa = np.polyfit(x, y, 1)
    assert (b, a) == (float(pb), float(pa)) and rss == pytest.approx(float(np.sum((y - (pa + pb * x)) ** 2)))
    assert slope_line([0, 1, np.nan, 3], [1, 3, 7, 7]) == pytest.approx(2.0)  # the NaN point left out
    assert math.isnan(slope_line([1, np.nan], [1, 2]))


def test_log_or_nan():
    assert log_or_nan(math.e) == pytest.approx(1.0)
    assert all(math.isnan(log_or_nan(x)) for x in (0.0, -1.0, math.nan, math.inf))


def test_seed_grid():
    g = seed_grid({"a": {0: 1.0, 2: 3.0}, "b": {1: 5.0, 7: 9.0}}, ["a", "b", "c"], [0, 1, 2])
    assert g.shape == (3, 3)
    assert g[0, 0] == 1.0 and g[2, 0] == 3.0 and g[1, 1] == 5.0
    assert np.isnan(g[1, 0]) and np.isnan(g[:, 2]).all()  # absent seed, absent column; seed 7 not asked


def test_config_by_scale_and_every_study_typed():
    @dataclass(frozen=True)
    class Toy(ScaledConfig):
        n: int

        @classmethod
        def quick(cls, opts):
            return cls(1)

        @classmethod
        def paper(cls, opts):
            return cls(2)

    assert Toy.of(Options(scale="quick")).n == 1 and Toy.of(Options(scale="paper")).n == 2
    for study in STUDIES.values():
        c = study().config(Options(scale="quick"))
        assert isinstance(c, ScaledConfig)
        with pytest.raises(FrozenInstanceError):
            c.data = {}  # type: ignore[misc]
