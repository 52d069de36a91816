"""Summaries of the demo's runs: means and spreads over seeds, the tables and the plot."""

from __future__ import annotations

import math
import statistics
from pathlib import Path


def mean_std(values) -> tuple[float, float]:
    """(mean, sample std) of a non-empty sequence of numbers; std 0 for one value."""
    values = list(values)
    if not values:
        raise ValueError("values must be a non-empty sequence of numbers")
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict], methods) -> dict:
    summary = {}
    for method in methods:
        rs = [r for r in runs if r["method"] == method]
        modalities = list(rs[0]["probe_acc"])
        summary[method] = {
            "test_acc": mean_std([r["test_acc"] for r in rs]),
            "probe_acc": {m: mean_std([r["probe_acc"][m] for r in rs]) for m in modalities},
            "unimodal_acc": {m: mean_std([r["unimodal_acc"][m] for r in rs]) for m in modalities},
            "seconds_per_epoch": statistics.mean(r["seconds_per_epoch"] for r in rs),
            "step_share": statistics.mean(r["step_share"] for r in rs),
        }
        if rs[0].get("update_fraction"):
            summary[method]["update_fraction"] = {
                m: {k: mean_std([r["update_fraction"][m][k] for r in rs]) for k in ("ratio", "expected", "realised")}
                for m in modalities
            }
    return summary


def format_fractions(result: dict) -> str:
    """The masked methods' mean ratio and realised update fraction per modality (mean over seeds)."""
    rows = ["| method | " + " | ".join(f"{m}: ratio -> realised" for m in _modalities(result)) + " |",
            "|" + "---|" * (1 + len(_modalities(result)))]
    for method, s in result["summary"].items():
        if "update_fraction" in s:
            cells = [f"{s['update_fraction'][m]['ratio'][0]:.3f} -> {s['update_fraction'][m]['realised'][0]:.3f}"
                     for m in _modalities(result)]
            rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def format_table(result: dict) -> str:
    """The methods' table (mean ± std over seeds, in %); with the encoders alone (``run(alone=True)``),
    a first row of their probes and a column of the share of the weak modality's gap each method
    closes."""
    modalities = _modalities(result)
    weak = result.get("weak")
    gap_header = f" {weak} gap closed |" if weak and "gap_closed" in result["summary"].get("joint", {}) else ""
    rows = ["| method | test fused acc | " + " | ".join(f"probe {m}" for m in modalities) + " | "
            + " | ".join(f"head slice {m}" for m in modalities) + " |" + gap_header + " s / epoch | in opt.step() |"]
    rows.append("|" + "---|" * (4 + 2 * len(modalities) + bool(gap_header)))
    if "alone_probe" in result:
        cells = ["-"] + [_percent(result["alone_probe"][m]) for m in modalities] + ["-"] * (len(modalities) + 2)
        rows.append("| each encoder alone | " + " | ".join(cells + ["-"] * bool(gap_header)) + " |")
    for method, s in result["summary"].items():
        cells = [_percent(s["test_acc"])] + [_percent(s["probe_acc"][m]) for m in modalities]
        cells += [_percent(s["unimodal_acc"][m]) for m in modalities]
        cells += [f"{100 * s['gap_closed'][weak]:.0f}%"] if gap_header else []
        cells += [f"{s['seconds_per_epoch']:.3f}", f"{100 * s['step_share']:.0f}%"]
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _percent(mean_std: tuple[float, float]) -> str:
    return f"{100 * mean_std[0]:.1f} ± {100 * mean_std[1]:.1f}"


def _modalities(result: dict) -> list[str]:
    return list(next(iter(result["summary"].values()))["probe_acc"])


def plot(result: dict, path: Path) -> None:
    """Fused accuracy per method (error bars), probe accuracy per modality, ratio/coefficient traces."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    methods = list(summary)
    modalities = _modalities(result)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    means = [100 * summary[m]["test_acc"][0] for m in methods]
    stds = [100 * summary[m]["test_acc"][1] for m in methods]
    axes[0].bar(methods, means, yerr=stds, capsize=4, color="tab:blue")
    axes[0].set_ylim(min(means) - 5, min(100, max(means) + 3))
    axes[0].set_title(f"test fused accuracy (%), {result['seeds']} seeds")
    axes[0].tick_params(axis="x", rotation=30)
    width = 0.8 / len(modalities)
    for j, mod in enumerate(modalities):
        xs = [i + j * width for i in range(len(methods))]
        axes[1].bar(xs, [100 * summary[m]["probe_acc"][mod][0] for m in methods], width,
                    yerr=[100 * summary[m]["probe_acc"][mod][1] for m in methods], capsize=3, label=mod)
    axes[1].set_xticks([i + width * (len(modalities) - 1) / 2 for i in range(len(methods))], methods, rotation=30)
    for j, mod in enumerate(modalities):
        if "alone_probe" in result:  # the reference: the same encoder trained on its own modality
            axes[1].axhline(100 * result["alone_probe"][mod][0], color=f"C{j}", linestyle="--", linewidth=1,
                            label=f"{mod} alone")
    axes[1].set_title("linear probe of each frozen encoder (%)")
    axes[1].legend()
    for method, style in (("amss+", "-"), ("ogm-ge", "--"), ("uniform", ":")):
        run = next((r for r in result["runs"] if r["method"] == method and r["seed"] == 0), None)
        if run is None:
            continue
        for mod in modalities:
            axes[2].plot([t.get(mod, math.nan) for t in run["trace"]], style, label=f"{method} {mod}")
    axes[2].set_title("per-epoch mean ratio (AMSS) / coefficient (OGM), seed 0")
    axes[2].set_xlabel("epoch")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
