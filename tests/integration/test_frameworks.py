"""The balancer inside the real frameworks (CPU): PyTorch Lightning and the Hugging Face Trainer
run the examples under ``examples/`` unchanged, with gradient accumulation and clipping; the
optimizer takes one set of balancer values per optimizer step and masking happens.

On CPU neither framework uses a GradScaler (Lightning turns 16-mixed into bf16-mixed, the
Trainer refuses fp16 without a GPU); the scaler path is tested in tests/test_balancer.py."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_masked(opt, balancer, steps: int) -> None:
    assert balancer.steps == steps  # one set of values per optimizer step, micro-batches pooled
    stats = opt.stats()
    for modality in ("audio", "visual"):
        assert 0.0 < stats[modality]["realised_fraction"] < 1.0, stats
        assert 0.1 <= stats[modality]["ratio"] <= 0.9, stats
    assert stats["(dense)"]["realised_fraction"] == 1.0


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning(precision):
    pytest.importorskip("lightning")
    module, trainer = _example("lightning_balancer").main(max_steps=6, accumulate=2, precision=precision)
    assert trainer.global_step == 6
    _assert_masked(trainer.optimizers[0], module.balancer, 6)


@pytest.mark.parametrize("via", ["optimizers", "optimizer_cls_and_kwargs"])
def test_hugging_face_trainer(via):
    pytest.importorskip("transformers")
    trainer = _example("hf_trainer_balancer").main(max_steps=6, via=via, accumulate=2)
    opt = trainer.optimizer.optimizer  # accelerate's wrapper around the fastmask optimizer
    assert trainer.state.global_step == 6
    _assert_masked(opt, opt.balancer, 6)


def test_quickstart_runs():
    import re
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py")], capture_output=True, text=True,
                         timeout=600, check=True).stdout
    assert "AMSSPlus" in out and "expected fraction" in out, out
    rows = re.findall(r"mean ratio ([\d.]+)  expected fraction ([\d.]+)  realised ([\d.]+)", out)
    assert len(rows) == 3, out
    for ratio, expected, realised in ((float(a), float(b), float(c)) for a, b, c in rows):
        # water-filling: the expected fraction is the ratio asked for; the realised one samples it
        assert abs(expected - ratio) <= 0.001 and abs(realised - expected) <= 0.02, out
