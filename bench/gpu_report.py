"""The GPU targets, read off ``fastmask bench`` JSON records: a markdown report for BENCHMARKS.md.

    python bench/gpu_report.py gpu_out/bench-*.json --out gpu_out/targets.md

Every ratio is taken within one JSON file (one bench run: its own copy bandwidth and torch
fused AdamW measured beside the variant). A target whose records are absent is reported as
"not measured", never as met.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LARGEST = 2**28
FAST = ("triton", "cuda", "cpp")


def load(paths: list[str]) -> list[dict]:
    """Records of every file, each tagged with the file (the run) it came from."""
    records = []
    for path in paths:
        for rec in json.loads(Path(path).read_text()):
            records.append({**rec, "run": Path(path).name})
    return records


def _find(records: list[dict], **match) -> list[dict]:
    return [r for r in records if all(r.get(k) == v for k, v in match.items())]


def targets(records: list[dict]) -> list[tuple[str, str, str, str]]:
    """(target, backend, measured, verdict) rows; verdict is "met", "MISSED" or "not measured"."""
    rows = []
    backends = sorted({r["backend"] for r in records if r["backend"] in FAST}, key=FAST.index)

    def row(target: str, backend: str, value: float | None, ok: bool | None, fmt: str) -> None:
        if value is None:
            rows.append((target, backend, "-", "not measured"))
        else:
            rows.append((target, backend, fmt.format(value), "met" if ok else "MISSED"))

    for b in backends or ["(none)"]:
        grad2 = _find(records, variant="amss+-adamw-grad2", backend=b, numel=LARGEST)
        row("grad2, 2^28 elements: >= 85% of copy bandwidth", b, grad2[0]["pct_copy_bw"] if grad2 else None,
            bool(grad2) and grad2[0]["pct_copy_bw"] >= 85, "{:.1f}%")
        row("grad2, 2^28 elements: <= 1.25x fused AdamW", b,
            grad2[0]["ratio_vs_torch_fused_adamw"] if grad2 else None,
            bool(grad2) and grad2[0]["ratio_vs_torch_fused_adamw"] <= 1.25, "{:.2f}x")
        ema = _find(records, variant="amss+-adamw-ema", backend=b, numel=LARGEST)
        row("ema, 2^28 elements: <= 1.5x fused AdamW", b, ema[0]["ratio_vs_torch_fused_adamw"] if ema else None,
            bool(ema) and ema[0]["ratio_vs_torch_fused_adamw"] <= 1.5, "{:.2f}x")
        small = _find(records, variant="amss+-adamw-grad2", backend=b, shape_set="small")
        row("grad2, small (2,000 x 4,096): <= 1.5x fused AdamW", b,
            small[0]["ratio_vs_torch_fused_adamw"] if small else None,
            bool(small) and small[0]["ratio_vs_torch_fused_adamw"] <= 1.5, "{:.2f}x")
        ours = _find(records, variant="amss+-adamw-grad2", backend=b, shape_set="av-resnet18")
        paper = [r for r in _find(records, variant="reference-style-amss+", shape_set="av-resnet18")
                 if ours and r["run"] == ours[0]["run"]]
        speedup = paper[0]["median_ms"] / ours[0]["median_ms"] if ours and paper else None
        row("av-resnet18: >= 20x faster than reference-style AMSS+", b, speedup,
            speedup is not None and speedup >= 20, "{:.1f}x")
    worst = None
    for t in _find(records, backend="triton"):
        for c in _find(records, backend="cuda", run=t["run"], variant=t["variant"], numel=t["numel"]):
            ratio = c["median_ms"] / t["median_ms"]
            if worst is None or ratio > worst[0]:
                worst = (ratio, f"{t['shape_set']} {t['numel']:,} {t['variant']}")
    row("cuda within 10% of triton (slowest case)", worst[1] if worst else "cuda/triton",
        worst[0] if worst else None, worst is not None and worst[0] <= 1.10, "{:.2f}x triton's time")
    return rows


def table(records: list[dict]) -> str:
    lines = ["| run | shape set | elements | variant | backend | median ms | GB/s (model) | % copy | x fused AdamW |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['run']} | {r['shape_set']} | {r['numel']:,} | {r['variant']} | {r['backend']} | "
                     f"{r['median_ms']:.3f} | {r['gbps']:.1f} | {r['pct_copy_bw']:.1f} | "
                     f"{r['ratio_vs_torch_fused_adamw']:.2f} |")
    return "\n".join(lines)


# traffic variant (bench/traffic.py) -> the bench variant that runs the same step
MODELLED = {"dense": "amss+-adamw-dense", "grad2": "amss+-adamw-grad2", "ema": "amss+-adamw-ema",
            "row": "amss+-adamw-grad2-row", "sgd": "amss-sgd-grad2"}


def model_vs_measured(traffic_rows: list[dict], records: list[dict]) -> str:
    """The traffic model's av-resnet18 time (fp32) beside the triton step measured on that set,
    each as a ratio to fused AdamW (modelled / measured in the same run): the first GPU run
    checks the model."""
    lines = ["| variant | model ms | measured ms (triton) | model x fused AdamW | measured x fused AdamW |",
             "|---|---|---|---|---|"]
    for row in traffic_rows:
        if row["dtype"] != "float32" or row["variant"] not in MODELLED:
            continue
        measured = _find(records, variant=MODELLED[row["variant"]], backend="triton", shape_set="av-resnet18")
        ms = f"{measured[0]['median_ms']:.3f}" if measured else "not measured"
        ratio = f"{measured[0]['ratio_vs_torch_fused_adamw']:.2f}" if measured else "not measured"
        lines.append(f"| {row['variant']} | {row['model_ms']:.3f} | {ms} | {row['model_ratio_vs_fused_adamw']:.2f} "
                     f"| {ratio} |")
    return "\n".join(lines)


def report(records: list[dict]) -> str:
    devices = sorted({r["device"] for r in records}) or ["(no records)"]
    out = [f"Device: {', '.join(devices)}. Runs: {', '.join(sorted({r['run'] for r in records})) or 'none'}.", "",
           "| target | backend | measured | verdict |", "|---|---|---|---|"]
    out += [f"| {t} | {b} | {m} | {v} |" for t, b, m, v in targets(records)]
    out += ["", table(records), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="*", help="bench JSON files (fastmask bench --json)")
    parser.add_argument("--out", help="write the markdown here (default: print it)")
    parser.add_argument("--traffic", help="fastmask bench --traffic's JSON: its model beside the measurements")
    args = parser.parse_args(argv)
    records = load(args.json)
    text = report(records)
    if args.traffic:
        rows = json.loads(Path(args.traffic).read_text())["rows"]
        text += ("\nThe traffic MODEL (counted bytes and launches, bench/traffic.py) beside the measured step, "
                 "av-resnet18, fp32:\n\n" + model_vs_measured(rows, records) + "\n")
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
