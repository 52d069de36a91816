"""The ``fastmask`` command (also ``python -m fastmask``)."""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from . import __version__
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastmask", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backends, versions, devices and why a backend is unavailable").set_defaults(
        run=_info
    )
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
