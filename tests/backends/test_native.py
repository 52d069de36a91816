"""Building the native extensions never hangs silently on a lock that a killed build left."""

import os
import subprocess
import sys
import time

import pytest

from fastmask.backends import native


def _lock(tmp_path, owner_pid=None, host=None):
    (tmp_path / "lock").touch()
    if owner_pid is not None:
        (tmp_path / native.BUILD_OWNER).write_text(f"{owner_pid} {host or native.socket.gethostname()}")
    return tmp_path / "lock"


def test_no_lock_returns_at_once(tmp_path):
    start = time.monotonic()
    native.wait_for_build_lock(tmp_path, timeout_s=5)
    assert time.monotonic() - start < 1


def test_lock_of_a_dead_process_is_removed(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock = _lock(tmp_path, gone.pid)
    with pytest.warns(RuntimeWarning, match=f"removed the build lock .*{gone.pid}"):
        native.wait_for_build_lock(tmp_path, timeout_s=5)
    assert not lock.exists() and not (tmp_path / native.BUILD_OWNER).exists()


@pytest.mark.parametrize("owner", ["live", "unknown", "other-host"])
def test_lock_still_held_is_a_clear_error_after_the_timeout(tmp_path, owner, capsys):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        pid = {"live": live.pid, "unknown": None, "other-host": 1}[owner]
        lock = _lock(tmp_path, pid, host="elsewhere" if owner == "other-host" else None)
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=f"build lock {lock}.*rm {lock}"):
            native.wait_for_build_lock(tmp_path, timeout_s=0.3, poll_s=0.05)
        assert time.monotonic() - start < 5 and lock.exists()
        assert "waiting for another process" in capsys.readouterr().err
    finally:
        live.kill()
        live.wait()


def test_lock_released_by_its_owner_lets_the_build_go_on(tmp_path):
    lock = _lock(tmp_path, os.getpid())
    releaser = subprocess.Popen([sys.executable, "-c", f"import time, os; time.sleep(0.3); os.remove({str(lock)!r})"])
    native.wait_for_build_lock(tmp_path, timeout_s=10, poll_s=0.05)
    releaser.wait()
    assert not lock.exists()


def test_build_directory_is_per_python_and_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    path = native.build_directory("fastmask_x")
    assert path.is_dir() and path.name == "fastmask_x" and path.is_relative_to(tmp_path)
    assert f"py{sys.version_info.major}{sys.version_info.minor}" in path.parent.name


class _Recording:
    """An extension whose masked_step records its arguments (the rest: the cpp extension's)."""

    def __init__(self, module):
        self.module, self.calls = module, []

    def __getattr__(self, name):
        return getattr(self.module, name)

    def masked_step(self, *args):
        self.calls.append(args)


def test_the_binding_gets_the_level_breakpoints_and_runs_no_pass_1_first():
    """The step calls the extension once: with ``sampling.level_events``' (x, a, c) for
    water-filling (none without), no sums and no unit importances (its binding runs pass 1 and
    solves the levels itself)."""
    import torch

    from fastmask.backends import cpp
    from fastmask.reference import sampling
    from fastmask.reference.spec import StepConfig, TensorBatch

    module = cpp.EXTENSION.module()
    if module is None:
        pytest.skip("the cpp backend cannot be built here")
    p, g = torch.randn(8, 4), torch.randn(8, 4)
    batch = TensorBatch([p], [g], [torch.tensor(0.0)], [0], exp_avgs=[torch.zeros_like(p)],
                        exp_avg_sqs=[torch.zeros_like(p)])
    for ratio, min_prob in ((0.5, 0.0), (0.5, 0.05), (1.0, 0.0)):
        recording = _Recording(module)
        cfg = StepConfig(ratio=ratio, unbiased=True, min_prob=min_prob)
        native.NativeStep(lambda: recording, settings_in_memory=False).masked_step_(batch, cfg, None, None)
        assert len(recording.calls) == 1
        *_, sums, unit_importance, levels = recording.calls[0]
        assert sums is None and unit_importance is None
        if cfg.water_filling:
            assert all(torch.equal(a, b) for a, b in zip(levels, sampling.level_events(min_prob, p.device)[1:]))
            assert len(levels) == 3
        else:
            assert levels == []
