"""The command-line entry points run and produce what they promise."""

import pytest
import torch

from fastmask import cli
from fastmask.bench import suites


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch   available" in out and "cpp" in out


def test_bench_records():
    timer = suites.Timer(torch.device("cpu"), min_time_s=0.0, min_iters=1)
    records = suites.run(torch.device("cpu"), sets=["av-resnet18"], variants=["amss-sgd-grad2"], backends=["torch"],
                         baselines=False, timer=timer, log=lambda _: None)
    assert [(r.variant, r.backend) for r in records] == [("torch-fused-adamw", "torch"), ("amss-sgd-grad2", "torch")]
    rec = suites.asdict(records[1])
    for key in ("device", "shape_set", "backend", "variant", "median_ms", "gbps", "pct_copy_bw",
                "ratio_vs_torch_fused_adamw"):
        assert key in rec
    # torchvision's ResNet-18 has 11,689,512 parameters, 513,000 of them in fc; the audio
    # encoder's 1-channel stem has 2 * 64 * 7 * 7 fewer; the head is 1024 -> 31
    visual = 11_689_512 - 513_000
    assert rec["numel"] == visual + (visual - 2 * 64 * 7 * 7) + 31 * 1024 + 31
    assert rec["median_ms"] > 0 and rec["ratio_vs_torch_fused_adamw"] > 0


def test_bench_records_in_bf16():
    timer = suites.Timer(torch.device("cpu"), min_time_s=0.0, min_iters=1)
    records = suites.run(torch.device("cpu"), sets=["large"], variants=["amss+-adamw-grad2"], backends=["cpp"],
                         baselines=False, timer=timer, log=lambda _: None, dtype="bf16")
    by_variant = {(r.variant, r.numel): r for r in records}
    variants = ("amss+-adamw-grad2", "torch-fused-adamw")
    assert sorted(by_variant) == sorted((v, n) for n in (2**22, 2**24) for v in variants)
    fused, step = by_variant["torch-fused-adamw", 2**22], by_variant["amss+-adamw-grad2", 2**22]
    # bf16 p and g (2 B), fastmask's fp32 m and v; torch's m and v are bf16
    assert (fused.bytes_per_element, step.bytes_per_element) == (14, 24)
    assert {r.dtype for r in records} == {"bf16"} and step.median_ms > 0
    assert suites.bytes_per_element("amss+-adamw-grad2", torch.float32) == 32
    with pytest.raises(ValueError, match="dtype"):
        suites.run(torch.device("cpu"), dtype="float64", log=lambda _: None)


def test_demo_on_the_imbalanced_set_runs_every_method_and_the_encoders_alone(monkeypatch, capsys):
    """What ``fastmask demo --dataset avdigits-imbalanced`` asks of ``demo.run`` (the runs
    themselves: tests/test_demo.py); ``--no-alone`` and ``--methods`` override the defaults."""
    from fastmask import demo

    calls = []

    def run(dataset, views, methods, seeds, epochs, out, hparams, alone):
        calls.append(dict(dataset=dataset, methods=methods, epochs=epochs, hparams=hparams, alone=alone))
        summary = {m: {"test_acc": (0.9, 0.0), "probe_acc": {"image": (0.9, 0.0), "audio": (0.7, 0.0)},
                       "unimodal_acc": {"image": (0.9, 0.0), "audio": (0.6, 0.0)}, "seconds_per_epoch": 1.0,
                       "step_share": 0.1, "gap_closed": {"image": 0.0, "audio": 0.5}} for m in methods}
        return {"summary": summary, "alone_probe": {"image": (0.9, 0.0), "audio": (0.8, 0.0)}, "weak": "audio",
                "step_ms": {"fused": 0.1}}

    monkeypatch.setattr(demo, "run", run)
    assert cli.main(["demo", "--dataset", "avdigits-imbalanced", "--seeds", "2"]) == 0
    assert calls[-1]["methods"] == list(demo.METHODS) and "amss+-official" in calls[-1]["methods"]
    assert calls[-1]["alone"] and calls[-1]["epochs"] == demo.EPOCHS["avdigits-imbalanced"]
    assert calls[-1]["hparams"] == demo.HPARAMS["avdigits-imbalanced"]
    out = capsys.readouterr().out
    assert "the weak encoder: audio" in out and "| audio gap closed |" in out and "| amss+-official |" in out
    assert cli.main(["demo", "--dataset", "segment", "--seeds", "2"]) == 0
    assert calls[-1]["methods"] == list(demo.DEFAULT_METHODS) and not calls[-1]["alone"]
    assert cli.main(["demo", "--dataset", "avdigits-imbalanced", "--no-alone", "--methods", "joint"]) == 0
    assert calls[-1]["methods"] == ["joint"] and not calls[-1]["alone"]
