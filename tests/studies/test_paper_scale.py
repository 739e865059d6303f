"""--scale paper: the networks each study trains there (Keskar's F1, C1-C4 by --network; Kaur's VGG-11), the
clear errors of a wrong --network, and `batchscope reproduce ... --scale paper` end to end on tiny CIFAR files.

The end-to-end runs keep the paper-scale configuration's data and network and shrink the rest (width, epochs,
grid, seeds: the studies' tiny configurations in tests/tiny_configs.py), so they finish in seconds on a CPU."""

import json
import sys
from dataclasses import replace

import pytest

import tiny_configs
from batchscope.cli import main
from batchscope.errors import BatchscopeError
from batchscope.store import Store
from batchscope.studies import Options
from batchscope.studies.kaur import KaurConfig
from batchscope.studies.keskar import Keskar, KeskarConfig
from helpers import read_claims, write_cifar_bin


def _paper(network=None, data="cifar10=/data/c10"):
    return Keskar().config(Options(scale="paper", data=[data], network=network))


@pytest.mark.parametrize("network, data, model", [
    (None, "cifar10=/d", "keskar_shallow"), ("C1", "cifar10=/d", "keskar_shallow"), ("C2", "cifar10=/d", "keskar_deep"),
    (None, "cifar100=/d", "keskar_shallow"), ("C3", "cifar100=/d", "keskar_shallow"), ("C4", "cifar100=/d", "keskar_deep"),
    (None, "mnist=/d", "mlp"), ("F1", "mnist=/d", "mlp"), ("F1", "fashion_mnist=/d", "mlp"),
])
def test_keskar_network_picks_the_model(network, data, model):
    c = _paper(network, data)
    assert c.model["name"] == model
    assert c.network == (network or {"cifar10": "C1", "cifar100": "C3", "mnist": "F1", "fashion_mnist": "F1"}[data.split("=")[0]])
    if model == "keskar_deep":
        assert c.model == {"name": "keskar_deep", "norm": "batch", "dropout": 0.5}  # the authors' rates (models/vgg.py)
    if model == "mlp":
        assert c.model == {"name": "mlp", "depth": 5, "norm": "batch"}  # F1: 5 x 512 with batch norm


@pytest.mark.parametrize("network, data, message", [
    ("C5", "cifar10=/d", r"--network C5: expected one of F1, C1, C2, C3, C4 \(F1: mnist or fashion_mnist; "
                         r"C1, C2: cifar10; C3, C4: cifar100\)"),
    ("c2", "cifar10=/d", "--network c2: expected one of F1, C1, C2, C3, C4"),
    ("C4", "cifar10=/d", "--network C4 needs --data cifar100, not cifar10"),
    ("C2", "cifar100=/d", "--network C2 needs --data cifar10, not cifar100"),
    ("F1", "cifar10=/d", "--network F1 needs --data mnist or fashion_mnist, not cifar10"),
])
def test_keskar_wrong_network_is_a_clear_error(network, data, message):
    with pytest.raises(BatchscopeError, match=message):
        _paper(network, data)


def test_network_is_refused_where_there_is_no_choice(capsys, monkeypatch, tmp_path):
    with pytest.raises(BatchscopeError, match="--network C2: only with --scale paper"):
        Keskar().config(Options(network="C2"))
    # through the command line: one line, exit code 2, before anything is trained
    assert _cli(monkeypatch, "reproduce", "kaur", "--scale", "paper", "--data", "cifar10=/d", "--network", "C1",
                "--store", str(tmp_path / "s.db")) == 2
    err = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert "error: --network C1: kaur has no choice of network (studies that have: keskar: F1, C1, C2, C3, C4)" in err
    assert not (tmp_path / "s.db").exists()


def _cli(monkeypatch, *args) -> int:
    """`batchscope *args` in this process (so the shrunk configurations apply); its exit code."""
    monkeypatch.setattr(sys, "argv", ["batchscope", *args])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code


def _shrink(monkeypatch, config_cls, shrink) -> list:
    """Make `config_cls.paper` return shrink(the paper's configuration); the configurations it made, in a list."""
    paper = config_cls.paper.__func__
    made = []

    def shrunk(cls, opts):
        made.append(paper(cls, opts))
        return shrink(made[-1])

    monkeypatch.setattr(config_cls, "paper", classmethod(shrunk))
    return made


def _shrink_keskar(c: KeskarConfig) -> KeskarConfig:
    # The paper's data and network at a sixteenth of its width, its dropout layers at a fifth of their rates (at the
    # paper's, a net this narrow stays at chance on 100 images for 20 epochs); LB half of the 100 training images
    # (10% would be below SB); the tiny configuration's grid, stopping rule and loose regime thresholds. The runs
    # need not fit: the claims then are untested (the slow test below has them fit and be measured).
    return replace(tiny_configs.KESKAR, data=c.data, model={**c.model, "width": 0.0625, "dropout": c.model["dropout"] / 5},
                   network=c.network, lb_fraction=0.5, epochs=20, warm_epochs=(1,))


@pytest.mark.parametrize("network, data", [("C2", "cifar10"), ("C4", "cifar100")])
def test_keskar_deep_net_reproduces_end_to_end(tmp_path, monkeypatch, network, data):
    d = write_cifar_bin(tmp_path, data)
    made = _shrink(monkeypatch, KeskarConfig, _shrink_keskar)
    out = tmp_path / "report"
    code = _cli(monkeypatch, "reproduce", "keskar", "--scale", "paper", "--network", network, "--data", f"{data}={d}",
                "--seeds", "1", "--device", "cpu", "--executor", "serial", "--store", str(tmp_path / "s.db"),
                "--out", str(out))
    assert code == 0
    assert made[0].network == network and made[0].model["name"] == "keskar_deep"
    doc, claims = read_claims(out)
    assert doc["study"] == "keskar" and doc["scale"] == "paper"
    assert doc["meta"]["models"] == ["keskar_deep"] and doc["meta"]["network"] == network
    assert doc["meta"]["runs_done"] == doc["meta"]["runs"] > 0
    # the published numbers beside the measured ones are the chosen network's (Tables 2 and 3)
    gap_sb, gap_lb = {"C2": (89.24, 87.26), "C4": (63.08, 57.81)}[network]
    gap = claims["gap"]["magnitude"][0]
    assert gap["published"] == pytest.approx(round(gap_sb - gap_lb, 2)) and network in gap["source"]
    sharp = claims["sharper_eps0.001"]["magnitude"][0]
    assert sharp["published"] == pytest.approx({"C2": 925.32 / 8.68, "C4": 421.84 / 12.83}[network], abs=0.05)
    half = claims["sharper_eps0.0005"]["magnitude"][0]  # Table 3 gives eps = 5e-4 for F1, C1 and C2 only
    assert (half["published"] is None) == (network == "C4")
    with Store(tmp_path / "s.db") as st:
        runs = st.runs()
    assert runs and {r.spec["model"]["name"] for r in runs} == {"keskar_deep"}
    assert {r.spec["data"]["name"] for r in runs} == {data}
    assert {r.status for r in runs} == {"done"}


def _shrink_kaur(c: KaurConfig) -> KaurConfig:
    # the paper's VGG-11 at a sixteenth of its width on the first 100 images, Lanczos on 50; the tiny
    # configuration's grids
    return replace(tiny_configs.KAUR, data={**c.data, "n_train": 100}, dropout_data=c.dropout_data,
                   model={**c.model, "width": 0.0625}, dropout_model={**c.dropout_model, "width": 0.05}, epochs=40,
                   gd_lrs=(0.2,), measure_examples=50)


def test_kaur_vgg11_reproduces_end_to_end(tmp_path, monkeypatch):
    d = write_cifar_bin(tmp_path, "cifar10")
    made = _shrink(monkeypatch, KaurConfig, _shrink_kaur)
    out = tmp_path / "report"
    code = _cli(monkeypatch, "reproduce", "kaur", "--scale", "paper", "--data", f"cifar10={d}", "--seeds", "1",
                "--device", "cpu", "--executor", "serial", "--store", str(tmp_path / "s.db"), "--out", str(out))
    assert code == 0
    assert made[0].model == {"name": "vgg11", "width": 1.0} and made[0].data["n_train"] == 1000
    doc = json.loads((out / "claims.json").read_text())
    assert doc["study"] == "kaur" and doc["scale"] == "paper" and doc["claims"]
    assert doc["meta"]["models"] == ["mlp", "vgg11"]  # the dropout grid's MLP (VGG-11 has no dropout), VGG-11 elsewhere
    with Store(tmp_path / "s.db") as st:
        runs = st.runs()
    vgg = [r for r in runs if r.spec["model"]["name"] == "vgg11"]
    assert vgg and {r.spec["data"]["name"] for r in runs} == {"cifar10"}
    assert {r.spec["model"].get("norm", "none") for r in vgg} == {"none", "batch"}  # with and without BN


@pytest.mark.slow
def test_keskar_deep_net_is_measured_where_it_fits(tmp_path, monkeypatch):
    # the same, with runs that fit and stop at a plateau (a larger step, SB 25, a larger cap), so that the SB and
    # LB solutions of keskar_deep are measured: sharpness, the top Hessian eigenvalue, the line between them
    d = write_cifar_bin(tmp_path, "cifar10")
    _shrink(monkeypatch, KeskarConfig,
            lambda c: replace(_shrink_keskar(c), lr=3e-3, sb=25, epochs=30, measure_examples=50))
    out = tmp_path / "report"
    code = _cli(monkeypatch, "reproduce", "keskar", "--scale", "paper", "--network", "C2", "--data", f"cifar10={d}",
                "--seeds", "1", "--device", "cpu", "--executor", "serial", "--store", str(tmp_path / "s.db"),
                "--out", str(out))
    assert code == 0
    doc, claims = read_claims(out)
    assert doc["meta"]["models"] == ["keskar_deep"]
    regime = {r["id"]: r for r in doc["regime"]}
    assert regime["sb_lb_fit"]["passed"] and regime["sb_lb_minimum"]["passed"]
    for cid, keys in (("gap", ("test_acc_SB", "test_acc_LB")), ("sharper_eps0.001", ("sharpness_SB", "sharpness_LB")),
                      ("hessian_top", ("lambda1_SB", "lambda1_LB"))):
        for k in keys:
            m = claims[cid]["measured"][k]
            assert m["n"] == 1 and m["mean"] > 0, (cid, k)
    assert (out / "figures" / "line_sb_lb.png").exists()
