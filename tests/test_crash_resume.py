"""A run killed with SIGKILL and resumed from its last checkpoint ends bit-identical."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _run(ckpt_dir: Path, sleep_s: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.crash_train", str(ckpt_dir), "60", "7", str(sleep_s)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    full.mkdir()
    crashed.mkdir()
    assert _run(full, 0.0).wait(timeout=600) == 0

    proc = _run(crashed, 0.05)
    ckpt = crashed / "ckpt.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # past the first checkpoint, mid-run
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (crashed / "final.pt").exists()
    resumed_from = torch.load(ckpt)["step"]
    assert 0 < resumed_from < 60

    assert _run(crashed, 0.0).wait(timeout=600) == 0
    a, b = torch.load(full / "final.pt"), torch.load(crashed / "final.pt")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
