"""The GPU check's target report: met / missed / not measured, ratios taken within one run."""

import json
import subprocess
from pathlib import Path

from fastmask.bench import gpu_report

ROOT = Path(__file__).resolve().parents[2]


def _rec(variant, backend, ms, *, shape_set="large", numel=2**28, pct=90.0, ratio=1.0, run="a.json"):
    return dict(device="NVIDIA H200", shape_set=shape_set, backend=backend, variant=variant, numel=numel,
                n_tensors=1, median_ms=ms, gbps=0.0, pct_copy_bw=pct, ratio_vs_torch_fused_adamw=ratio,
                bytes_per_element=32, actual_bytes_per_element=32, run=run)


def _verdicts(records):
    return {(t, b): (m, v) for t, b, m, v in gpu_report.targets(records)}


def test_targets_met_missed_and_not_measured():
    records = [
        _rec("amss+-adamw-grad2", "triton", 2.0, pct=88.0, ratio=1.2),
        _rec("amss+-adamw-grad2", "cuda", 2.4, pct=70.0, ratio=1.4),
        _rec("amss+-adamw-ema", "triton", 2.0, ratio=1.6),
        _rec("amss+-adamw-grad2", "triton", 1.0, shape_set="av-resnet18", numel=10, run="b.json"),
        _rec("reference-style-amss+", "torch", 25.0, shape_set="av-resnet18", numel=10, run="b.json"),
    ]
    v = _verdicts(records)
    assert v[("grad2, 2^28 elements: >= 85% of copy bandwidth", "triton")] == ("88.0%", "met")
    assert v[("grad2, 2^28 elements: >= 85% of copy bandwidth", "cuda")] == ("70.0%", "MISSED")
    assert v[("grad2, 2^28 elements: <= 1.25x fused AdamW", "cuda")] == ("1.40x", "MISSED")
    assert v[("ema, 2^28 elements: <= 1.5x fused AdamW", "triton")] == ("1.60x", "MISSED")
    assert v[("ema, 2^28 elements: <= 1.5x fused AdamW", "cuda")] == ("-", "not measured")
    assert v[("grad2, small (2,000 x 4,096): <= 1.5x fused AdamW", "triton")] == ("-", "not measured")
    assert v[("av-resnet18: >= 20x faster than reference-style AMSS+", "triton")] == ("25.0x", "met")
    # the slowest cuda/triton pair of one run: 2.4 / 2.0
    assert v[("cuda within 10% of triton (slowest case)", "large 268,435,456 amss+-adamw-grad2")] == (
        "1.20x triton's time", "MISSED")


def test_ratios_are_never_taken_across_runs():
    records = [
        _rec("amss+-adamw-grad2", "cuda", 1.0, shape_set="av-resnet18", numel=10, run="b.json"),
        _rec("reference-style-amss+", "torch", 25.0, shape_set="av-resnet18", numel=10, run="c.json"),
        _rec("amss+-adamw-grad2", "triton", 1.0, run="d.json"),
    ]
    v = _verdicts(records)
    assert v[("av-resnet18: >= 20x faster than reference-style AMSS+", "cuda")] == ("-", "not measured")
    assert v[("cuda within 10% of triton (slowest case)", "cuda/triton")] == ("-", "not measured")


def test_cli_writes_the_report(tmp_path):
    path = tmp_path / "bench-large.json"
    record = _rec("amss+-adamw-grad2", "triton", 2.0)
    record.pop("run")
    path.write_text(json.dumps([record]))
    gpu_report.main([str(path), "--out", str(tmp_path / "targets.md")])
    text = (tmp_path / "targets.md").read_text()
    assert "bench-large.json" in text and "| grad2, 2^28 elements: >= 85% of copy bandwidth | triton | 90.0% | met |" in text


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], check=True)


def test_traffic_model_beside_the_measured_step():
    rows = [dict(variant="grad2", dtype="float32", model_ms=0.84, model_ratio_vs_fused_adamw=5.38),
            dict(variant="grad2", dtype="bfloat16", model_ms=0.8, model_ratio_vs_fused_adamw=6.4),
            dict(variant="row", dtype="float32", model_ms=0.73, model_ratio_vs_fused_adamw=4.7)]
    records = [_rec("amss+-adamw-grad2", "triton", 0.9, shape_set="av-resnet18", numel=10, ratio=5.1)]
    lines = gpu_report.model_vs_measured(rows, records).splitlines()
    assert lines[2:] == ["| grad2 | 0.840 | 0.900 | 5.38 | 5.10 |",
                         "| row | 0.730 | not measured | 4.70 | not measured |"]
