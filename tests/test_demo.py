"""The demo trains every method through the public API and writes its report."""

import json

import pytest
import torch

pytest.importorskip("river")

from fastmask import data, demo  # noqa: E402


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
