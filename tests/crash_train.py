"""A training script that checkpoints every N steps and resumes from its last checkpoint.

Used by tests/test_crash_resume.py, which SIGKILLs it mid-run. Usage:
python -m tests.crash_train CKPT_DIR STEPS EVERY SLEEP_S
"""

import os
import sys
import time

import torch

import fastmask
from tests.optim.models import loss_of, make_model


def batch(step: int):
    gen = torch.Generator().manual_seed(1000 + step)  # the data of a step depends on the step only
    return (torch.randn(6, 1, 8, 8, generator=gen), torch.randn(6, 3, 8, 8, generator=gen),
            torch.randint(0, 5, (6,), generator=gen))


def main(ckpt_dir: str, steps: int, every: int, sleep_s: float) -> None:
    torch.manual_seed(0)
    model = make_model(seed=0)
    opt = fastmask.AMSSPlus(model.groups(), lr=1e-2, importance="ema")  # seed drawn from torch's RNG
    path = os.path.join(ckpt_dir, "ckpt.pt")
    start = 0
    if os.path.exists(path):
        ckpt = torch.load(path)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        start = ckpt["step"]
    for step in range(start, steps):
        opt.zero_grad()
        loss_of(model, batch(step)).backward()
        opt.step(ratios={"audio": 0.3 + 0.5 * (step % 3) / 3, "visual": 0.6})
        if (step + 1) % every == 0:
            tmp = path + ".tmp"
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1}, tmp)
            os.replace(tmp, path)  # atomic: a kill never leaves half a checkpoint
        time.sleep(sleep_s)
    torch.save([p.detach() for p in model.parameters()], os.path.join(ckpt_dir, "final.pt"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
