"""The command-line entry points run and produce what they promise."""

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
