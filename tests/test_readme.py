"""The README's first snippet runs as written on a two-modality model."""

import pathlib
import re

import torch
import torch.nn.functional as F

from tests.optim.models import TwoTower, batches

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _section_code(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


class _Model(TwoTower):
    def forward(self, x):
        return super().forward(*x)


def test_the_change_to_the_training_loop_runs_and_balances():
    torch.manual_seed(0)
    model = _Model()
    loader = [((a, v), y) for a, v, y in batches(4, seed=30)]
    scope = {"model": model, "loader": loader, "F": F}
    exec(_section_code("## The change to your training loop"), scope)
    opt, balancer = scope["opt"], scope["balancer"]
    assert balancer.steps == 4
    ratios = {m: opt.ratio(m).item() for m in ("audio", "visual")}
    assert all(0.1 <= r <= 0.9 for r in ratios.values()) and opt.stats()["audio"]["realised_fraction"] < 1.0
