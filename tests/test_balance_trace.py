"""Balancer.history() and fastmask.plot_balance: what the balancer measured and handed out, step by step."""

import math

import matplotlib
import pytest
import torch
import torch.nn.functional as F

import fastmask
from fastmask import significance as sig
from tests.optim.models import batches, make_model

matplotlib.use("Agg")


def _run(cls, steps, history_size, **kwargs):
    """Train with a balancer; returns it and, per step, what significance gives on that step's batch."""
    model = make_model()
    balancer = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head,
                                 history_size=history_size)
    opt = cls(model.groups(), lr=1e-2, seed=0, balancer=balancer, **kwargs)
    expected = []
    for a, v, y in batches(steps, seed=4):
        loss = F.cross_entropy(model(a, v), y)
        balancer.observe(y)
        with torch.no_grad():
            feats = {"audio": model.audio(a), "visual": model.visual(v)}
            logits = sig.unimodal_logits(model.head, feats)
            mir = sig.mutual_information_rate(logits, y, feats)
        opt.zero_grad()
        loss.backward()
        opt.step()
        expected.append({m: dict(accuracy=(logits[m].argmax(1) == y).double().mean().item(),
                                 true_class_prob=F.softmax(logits[m].double(), 1).gather(1, y[:, None]).mean().item(),
                                 mi_rate=mir[m], value=opt._setting(m).item() if torch.is_tensor(opt._setting(m))
                                 else opt._setting(m)) for m in ("audio", "visual")})
    return balancer, expected


def test_history_holds_bucket_means_of_every_step():
    """6 steps in at most 4 buckets: steps 0-3 fill 4 buckets, which merge into 2 of 2 steps;
    steps 4-5 fill a third. Each is the mean of its steps, as significance computes them."""
    balancer, expected = _run(fastmask.AMSSPlus, 6, history_size=4)
    history = balancer.history()
    assert history["step"] == [0, 2, 4] and history["good_steps"] == [2, 2, 2] and history["value"] == "ratio"
    for m in ("audio", "visual"):
        for name in ("accuracy", "true_class_prob", "mi_rate", "ratio"):
            key = "value" if name == "ratio" else name
            means = [(expected[i][m][key] + expected[i + 1][m][key]) / 2 for i in (0, 2, 4)]
            assert history[m][name] == pytest.approx(means, rel=1e-6, abs=1e-9), (m, name)
    assert balancer.history("audio") == history["audio"]


def test_history_of_ogm_holds_the_coefficients():
    balancer, expected = _run(fastmask.OGM, 3, history_size=8)
    history = balancer.history()
    assert history["step"] == [0, 1, 2] and history["value"] == "coefficient"
    assert history["visual"]["coefficient"] == pytest.approx([e["visual"]["value"] for e in expected], abs=1e-6)
    assert min(history["audio"]["coefficient"] + history["visual"]["coefficient"]) < 1.0  # one was slowed


def test_history_errors():
    model = make_model()
    balancer = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head)
    with pytest.raises(RuntimeError, match="no step has taken the balancer's values yet"):
        balancer.history()
    with pytest.raises(ValueError, match="modality 'text' is not measured by this balancer"):
        balancer.history("text")
    with pytest.raises(ValueError, match="history_size must be even"):
        fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head, history_size=5)


def test_a_step_without_good_statistics_leaves_its_bucket_empty():
    model = make_model()
    balancer = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head)
    a, v, y = batches(1)[0]
    model(a * math.nan, v)
    with pytest.warns(RuntimeWarning, match="audio"):
        balancer.observe(y)
    balancer.take("ratios")
    history = balancer.history()
    assert history["good_steps"] == [0] and math.isnan(history["audio"]["accuracy"][0])


def test_plot_balance_draws_every_panel(tmp_path):
    balancer, _ = _run(fastmask.AMSSPlus, 3, history_size=8)
    fig = fastmask.plot_balance(balancer.history(), tmp_path / "balance.png")
    assert (tmp_path / "balance.png").stat().st_size > 0
    assert [ax.get_title() for ax in fig.axes] == ["head-slice accuracy", "mean true-class probability",
                                                   "mutual-information rate", "ratio handed out"]
    assert all(len(ax.get_lines()) == 2 for ax in fig.axes)
    with pytest.raises(TypeError, match="Balancer.history"):
        fastmask.plot_balance([1, 2])
