"""The ``fastmask`` command (also ``python -m fastmask``)."""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from . import __version__
from .demo import data as datasets
from .ops import backend_report


def _info(_: argparse.Namespace) -> int:
    print(f"fastmask {__version__}  torch {torch.__version__}  python {platform.python_version()}")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        print(f"\n{device} ({name})")
        for backend, reason in backend_report(device).items():
            print(f"  {backend:7s} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


def _traffic(args: argparse.Namespace) -> int:
    """The Triton step's counted traffic and launches, and the GPU time they model."""
    import os

    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--traffic runs the kernels in Triton's interpreter, and triton is already imported "
                         "without TRITON_INTERPRET=1: run `TRITON_INTERPRET=1 fastmask bench --traffic`")
    os.environ["TRITON_INTERPRET"] = "1"
    from .bench import traffic

    unknown = [v for v in args.variants or [] if v not in traffic.VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown} with --traffic; choose from {list(traffic.VARIANTS)}")
    bandwidth = traffic.H200_COPY_TBPS if args.bandwidth_tbps is None else args.bandwidth_tbps
    launch_us = traffic.LAUNCH_US if args.launch_us is None else args.launch_us
    if not 0 < bandwidth < float("inf"):
        raise SystemExit(f"--bandwidth-tbps must be a positive number of TB/s, got {bandwidth}")
    if not 0 <= launch_us < float("inf"):
        raise SystemExit(f"--launch-us must be >= 0 microseconds, got {launch_us}")
    rows = traffic.run(args.variants, bandwidth_tbps=bandwidth, launch_us=launch_us)
    print(traffic.table(rows, bandwidth, launch_us))
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"note": "bytes and launches counted in Triton's interpreter; model_* are a model, not "
                               "measurements", "bandwidth_tbps": bandwidth, "launch_us": launch_us,
                       "rows": [traffic.asdict(r) for r in rows]}, f, indent=1)
        print(f"wrote {len(rows)} rows to {args.json}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.traffic:
        return _traffic(args)
    from .bench import suites

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    timer = suites.Timer(device, min_time_s=0.2 if args.quick else 0.5, min_iters=3 if args.quick else 5)
    records = suites.run(device, sets=args.sets, variants=args.variants, backends=args.backends,
                         baselines=not args.no_baselines, compile_baseline=args.compile, timer=timer,
                         dtype=args.dtype)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump([suites.asdict(r) for r in records], f, indent=1)
        print(f"wrote {len(records)} records to {args.json}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from . import demo

    methods = args.methods or list(demo.METHODS if args.dataset in demo.SYMPTOM_DATASETS else demo.DEFAULT_METHODS)
    unknown = [m for m in methods if m not in demo.METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(demo.METHODS)}")
    hparams = dict(demo.HPARAMS.get(args.dataset, demo.DEFAULT_HPARAMS))
    epochs = args.epochs or demo.EPOCHS[args.dataset]
    if args.tune:
        hparams.update(demo.tune(args.dataset, args.views, epochs, methods))
        print("chosen hyper-parameters:", hparams, flush=True)
    alone = args.dataset in demo.SYMPTOM_DATASETS if args.alone is None else args.alone
    result = demo.run(args.dataset, args.views, methods, args.seeds, epochs, args.out, hparams, alone=alone)
    print(f"\n{args.dataset}{' ' + '+'.join(args.views) if args.views else ''}: mean ± std over {args.seeds} seeds\n")
    if alone:
        print(f"each encoder alone: trained on its own modality ({args.seeds} seeds); the weak encoder: "
              f"{result['weak']}\n")
    print(demo.format_table(result))
    print("\none optimizer step on this model, median ms: " + ", ".join(
        f"{name} {ms:.3f}" for name, ms in result["step_ms"].items()))
    if any("update_fraction" in s for s in result["summary"].values()):
        print("\nmasked methods, per modality: mean ratio asked for -> fraction of units updated\n")
        print(demo.format_fractions(result))
    print(f"\nwrote {args.out}/results.json and {args.out}/results.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastmask", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fastmask {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backends, versions, devices and why a backend is unavailable").set_defaults(
        run=_info
    )
    bench = sub.add_parser("bench", help="time the fused step against torch's AdamW and the baselines")
    bench.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    bench.add_argument("--sets", nargs="+", choices=["large", "av-resnet18", "small"], help="shape sets (default all)")
    bench.add_argument("--variants", nargs="+", help="e.g. amss+-adamw-grad2 amss+-adamw-ema amss-sgd-grad2")
    bench.add_argument("--backends", nargs="+", help="default: every backend that runs on the device")
    bench.add_argument("--no-baselines", action="store_true", help="only torch fused AdamW and fastmask")
    bench.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                       help="the params' and grads' dtype (fastmask's states stay fp32; default fp32)")
    bench.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="include torch.compile of the reference step (default: on GPU only)")
    bench.add_argument("--quick", action="store_true", help="fewer iterations")
    bench.add_argument("--json", help="write the records to this file")
    bench.add_argument("--traffic", action="store_true",
                       help="count the Triton step's bytes per element, launches and device ops in Triton's "
                            "interpreter (no GPU needed) and model its GPU time")
    bench.add_argument("--bandwidth-tbps", type=float,
                       help="--traffic: the model's memory bandwidth (default 4.3, an H200's measured copy)")
    bench.add_argument("--launch-us", type=float,
                       help="--traffic: the model's cost of a launch or device op in us (default 5)")
    bench.set_defaults(run=_bench)
    demo = sub.add_parser("demo", help="train balanced multi-modal models on real data with every method")
    demo.add_argument("--dataset", choices=list(datasets.DATASETS), default="segment")
    demo.add_argument("--views", nargs="+", help="mfeat views (default fou zer)")
    demo.add_argument("--methods", nargs="+", help="default: joint uniform amss amss+ ogm-ge opm mimo, and amss+-official "
                                                   "on avdigits-imbalanced (elsewhere on request)")
    demo.add_argument("--seeds", type=int, default=5)
    demo.add_argument("--epochs", type=int, help="at most (default: 60, avdigits 20); early stopping on validation "
                                                 "accuracy")
    demo.add_argument("--out", default="demo_out")
    demo.add_argument("--alone", action=argparse.BooleanOptionalAction, default=None,
                      help="also train each encoder on its own modality, the reference of the weak encoder's gap "
                           "(default: on for avdigits-imbalanced)")
    demo.add_argument("--tune", action="store_true", help="choose hyper-parameters by the grid on validation first")
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
