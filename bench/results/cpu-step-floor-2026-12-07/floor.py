"""Where one AMSS+ step on the AV-digits model spends its time (step_speed's setup: every param with
a gradient, ratio 0.5 per modality, AdamW base; 0.22 M params in 14 tensors, three groups). Prints
one JSON line, microseconds, each figure the best of 7 repeats (the minimum: what a quiet machine
gives):
- the step, fused AdamW on one group and on the same three groups, fused AdamW's kernel alone
  (``torch._fused_adamw_`` on the same lists), and the step with its binding a no-op (its Python);
- per group: the binding, timed alone, and its pass 1 (with the importance histogram, without it,
  and without the importance sums), and the water levels;
- the binding's fixed cost: 1, 6 and 14 tensors of 8 elements.
With the argument "avx2" (run under ATEN_CPU_CAPABILITY=avx2): the emulated AVX2 machine of
fastmask.bench.avx2_machine. OMP_NUM_THREADS sets the extension's threads (the record says which)."""
import json, sys, timeit
import torch, fastmask
from fastmask.backends import cpp
if sys.argv[1:] == ["avx2"]:
    assert torch.backends.cpu.get_cpu_capability() == "AVX2"
    cpp.EXTENSION = cpp.rng_variant("avx2", cap_at_avx2=True)
from fastmask.demo.data import load
from fastmask.demo.models import FusionNet
from fastmask.demo.settings import COMMON


def best(f, number=1000):
    f()
    return min(timeit.repeat(f, number=number, repeat=7)) / number * 1e6


def captured_calls(opt, ext, settings):
    """The binding's arguments, one tuple per call of one step."""
    calls, real = [], ext.masked_step
    ext.masked_step = lambda *a: calls.append(a)
    opt.step(**settings)
    ext.masked_step = real
    return calls


def config_without(ext, config, **changes):
    copy = ext.KernelConfig()
    for name in dir(config):
        if not name.startswith("_") and not callable(getattr(config, name)):
            setattr(copy, name, getattr(config, name))
    for name, value in changes.items():
        setattr(copy, name, value)
    return copy


ds = load("avdigits", None, 0)
torch.manual_seed(0)
model = FusionNet(ds.shapes(), ds.n_classes, COMMON["hidden"])
for p in model.parameters():
    p.grad = torch.randn_like(p) * 1e-3
ratios = {m: 0.5 for m in model.order}
ext = cpp.EXTENSION.module()
out = {"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}

fused = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
fused3 = torch.optim.AdamW([{"params": g["params"]} for g in model.groups()], lr=1e-3, fused=True)
out["fused AdamW step"] = best(fused.step)
out["fused AdamW step, three groups"] = best(fused3.step)
fused.step()
params = list(model.parameters())
state = [fused.state[p] for p in params]
exp_avgs, exp_avg_sqs, steps = ([s[k] for s in state] for k in ("exp_avg", "exp_avg_sq", "step"))


def fused_kernel():  # what fused AdamW's step runs: the step counts' increment and the kernel
    torch._foreach_add_(steps, 1)
    torch._fused_adamw_(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, [], steps, lr=1e-3, beta1=0.9,
                        beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False)


out["fused AdamW kernel"] = best(fused_kernel)

opt = fastmask.AMSSPlus(model.groups(), lr=1e-3, base="adamw")
out["AMSS+ step"] = best(lambda: opt.step(ratios=ratios))
real = ext.masked_step
ext.masked_step = lambda *a: None
out["AMSS+ step, binding a no-op"] = best(lambda: opt.step(ratios=ratios))
ext.masked_step = real

for a in captured_calls(opt, ext, {"ratios": ratios}):
    grads, fishers, config, events = a[1], a[6], a[8], a[-1]
    name = f"group of {sum(p.numel() for p in a[0])} elements in {len(a[0])} tensors"
    group = out[name] = {"binding": best(lambda: real(*a))}
    group["pass 1"] = best(lambda: ext.masked_step_sums(a[0], grads, fishers, config, None, False))
    if events:
        sums, _ = ext.masked_step_sums(a[0], grads, fishers, config, None, False)
        group["water levels"] = best(lambda: ext.water_levels(sums, config.ratio, config.min_prob, *events))
        no_bins = config_without(ext, config, water_filling=False)
        group["pass 1 without the histogram"] = best(lambda: ext.masked_step_sums(a[0], grads, fishers, no_bins, None,
                                                                                  False))
        no_sums = config_without(ext, config, water_filling=False, is_masked=False)
        group["pass 1 without the histogram and the importance sums"] = best(
            lambda: ext.masked_step_sums(a[0], grads, fishers, no_sums, None, False))

for n_tensors in (1, 6, 14):
    tiny = [torch.nn.Parameter(torch.randn(8)) for _ in range(n_tensors)]
    for p in tiny:
        p.grad = torch.randn_like(p)
    tiny_opt = fastmask.AMSSPlus([{"params": tiny, "modality": "a"}], lr=1e-3, base="adamw")
    (a,) = captured_calls(tiny_opt, ext, {"ratios": {"a": 0.5}})
    out[f"binding, {n_tensors} tensors of 8 elements"] = best(lambda: real(*a), 5000)

print(json.dumps({k: ({kk: round(vv, 2) for kk, vv in v.items()} if isinstance(v, dict) else
                      round(v, 2) if isinstance(v, float) else v) for k, v in out.items()}))
