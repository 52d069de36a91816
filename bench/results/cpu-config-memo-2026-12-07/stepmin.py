"""One step on the AV-digits model (step_speed's setup: every param with a gradient, ratio 0.5 per
modality), the best of 7 repeats of 1000 steps each (the minimum: what a quiet machine gives),
for torch's fused AdamW and fastmask's AMSS+ (cpp), and AMSS+ with its binding replaced by a
no-op (the step's Python alone). Prints one JSON line, microseconds. With the argument "avx2"
(run under ATEN_CPU_CAPABILITY=avx2): the emulated AVX2 machine of fastmask.bench.avx2_machine."""
import json, sys, timeit, torch, fastmask
from fastmask.backends import cpp
if sys.argv[1:] == ["avx2"]:
    assert torch.backends.cpu.get_cpu_capability() == "AVX2"
    cpp.EXTENSION = cpp.rng_variant("avx2", cap_at_avx2=True)
from fastmask.demo.data import load
from fastmask.demo.models import FusionNet
from fastmask.demo.settings import COMMON
ds = load("avdigits", None, 0)
torch.manual_seed(0)
model = FusionNet(ds.shapes(), ds.n_classes, COMMON["hidden"])
for p in model.parameters():
    p.grad = torch.randn_like(p) * 1e-3
ratios = {m: 0.5 for m in model.order}
fused = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
opt = fastmask.AMSSPlus(model.groups(), lr=1e-3, base="adamw")
def best(f):
    f()
    return min(timeit.repeat(f, number=1000, repeat=7)) / 1000 * 1e6
out = {"fused AdamW": best(fused.step), "AMSS+": best(lambda: opt.step(ratios=ratios))}
ext = cpp.EXTENSION.module()
real, ext.masked_step = ext.masked_step, lambda *a: None
out["AMSS+ binding no-op"] = best(lambda: opt.step(ratios=ratios))
ext.masked_step = real
print(json.dumps({k: round(v, 1) for k, v in out.items()}))
