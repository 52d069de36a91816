"""The demo trains every method through the public API and writes its report."""

import json

import pytest
import torch

pytest.importorskip("river")

from fastmask import demo  # noqa: E402
from fastmask.demo import data  # noqa: E402


@pytest.mark.parametrize("method", demo.METHODS)
def test_every_method_trains(method):
    d = data.load_segment(seed=0)
    r = demo.train(d, method, seed=0, epochs=3, hp=demo.DEFAULT_HPARAMS[method])
    assert 0.5 < r["test_acc"] <= 1.0 and 0 <= r["best_epoch"] < 3
    assert set(r["probe_acc"]) == {"shape", "colour"} and set(r["unimodal_acc"]) == {"shape", "colour"}
    if method in ("uniform", "amss", "amss+"):
        assert all(0.1 <= t[m] <= 0.9 for t in r["trace"] for m in t)  # the clipped AMSS ratios
    if method == "ogm-ge":
        assert all(0 < t[m] <= 1 for t in r["trace"] for m in t)


def test_run_writes_results_and_figure(tmp_path):
    result = demo.run("segment", None, ["joint", "amss+"], seeds=2, epochs=2, out=tmp_path, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"].keys() == {"joint", "amss+"} and len(saved["runs"]) == 4
    assert (tmp_path / "results.png").stat().st_size > 10_000
    assert "| amss+ |" in demo.format_table(result)
    assert "| amss+ |" in demo.format_fractions(result) and "| joint |" not in demo.format_fractions(result)
    for fraction in saved["summary"]["amss+"]["update_fraction"].values():
        # water-filling: the expected fraction is the ratio asked for (means over the same steps)
        assert abs(fraction["expected"][0] - fraction["ratio"][0]) < 1e-4
        assert abs(fraction["realised"][0] - fraction["expected"][0]) < 0.05


def test_run_alone_reports_each_encoder_alone_and_the_gap_each_method_closes(tmp_path):
    result = demo.run("segment", None, ["joint", "amss+"], seeds=2, epochs=2, out=tmp_path, progress=False,
                      alone=True)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["runs"]) == 8 and {r["method"] for r in saved["runs"]} == {"joint", "amss+", "shape alone",
                                                                             "colour alone"}
    alone = {m: [r["probe_acc"][m] for r in saved["runs"] if r["method"] == f"{m} alone"] for m in ("shape", "colour")}
    assert saved["alone_probe"] == {m: list(demo.mean_std(v)) for m, v in alone.items()}
    assert saved["weak"] == min(alone, key=lambda m: sum(alone[m]))
    joint, weak = saved["summary"]["joint"], saved["weak"]
    for method, s in saved["summary"].items():
        gap = saved["alone_probe"][weak][0] - joint["probe_acc"][weak][0]
        share = (s["probe_acc"][weak][0] - joint["probe_acc"][weak][0]) / gap
        assert s["gap_closed"][weak] == pytest.approx(share) if gap > 0 else s["gap_closed"][weak] != s["gap_closed"][weak]
    table = demo.format_table(result)
    assert f"| {weak} gap closed |" in table and "| each encoder alone | - |" in table
    assert all(line.count("|") == table.splitlines()[0].count("|") for line in table.splitlines())


def test_gap_closed_is_the_share_of_the_weak_encoders_gap():
    alone, joint = {"a": (0.9, 0.0), "b": (0.8, 0.1)}, {"a": (0.6, 0.0), "b": (0.85, 0.0)}
    closed = demo.gap_closed({"a": (0.75, 0.02), "b": (0.9, 0.0)}, joint, alone)
    assert closed["a"] == pytest.approx(0.5) and closed["b"] != closed["b"]  # no gap on b: NaN
    assert demo.gap_closed(joint, joint, alone)["a"] == 0.0 and demo.gap_closed(alone, joint, alone)["a"] == 1.0


def test_run_refuses_a_non_bool_alone_before_training(tmp_path):
    with pytest.raises(TypeError, match="alone must be a bool"):
        demo.run("segment", None, ["joint"], seeds=1, epochs=1, out=tmp_path, progress=False, alone="yes")
    assert not (tmp_path / "results.json").exists()


def test_bad_method():
    with pytest.raises(ValueError, match="method"):
        demo.train(data.load_segment(0), "gradnorm", 0, 1, {})


def test_one_modality_alone_with_validation_probes_and_patience():
    """What the symptom search trains: an encoder on its own modality, probed on validation."""
    d = data.load_segment(seed=0)
    alone = d.only("colour")
    assert alone.modalities == ["colour"] and torch.equal(alone.val[0]["colour"], d.val[0]["colour"])
    r = demo.train(alone, "joint", seed=0, epochs=4, hp={"lr": 0.05}, patience=1, probe_split="val")
    assert set(r["probe_acc"]) == {"colour"} and 0.3 < r["probe_acc"]["colour"] <= 1.0
    model = demo.FusionNet(d.shapes(), d.n_classes, 8)
    assert demo.linear_probe(model, d, 0, "val").keys() == {"shape", "colour"}
    with pytest.raises(ValueError, match="split must be 'test' or 'val'"):
        demo.linear_probe(model, d, 0, "train")
    with pytest.raises(ValueError, match="modality 'audio' is not one of"):
        d.only("audio")


def test_train_rejects_bad_patience_and_probe_split_before_training():
    d = data.load_segment(seed=0)
    with pytest.raises(ValueError, match="patience"):
        demo.train(d, "joint", 0, 1, {"lr": 0.05}, patience=0)
    with pytest.raises(ValueError, match="probe_split must be 'test' or 'val'"):
        demo.train(d, "joint", 0, 1, {"lr": 0.05}, probe_split="train")


def test_mean_std_of_nothing_is_a_clear_error():
    assert demo.mean_std([2.0]) == (2.0, 0.0)
    with pytest.raises(ValueError, match="values must be a non-empty"):
        demo.mean_std([])
