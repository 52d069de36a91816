"""fastmask.Balancer and fastmask.modality_groups: significance from the forward pass, handed
to the optimizers; the same values as fastmask.significance computes from one batch."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmask
from fastmask import significance as sig
from tests.optim.models import TwoTower, batches, make_model


@torch.no_grad()  # an extra forward pass, which the balancer does not capture
def _features(model: TwoTower, a: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"audio": model.audio(a), "visual": model.visual(v)}


def _expected(model: TwoTower, batch, kind: str, **rule) -> dict[str, float]:
    """What the significance functions give for one batch (the manual path)."""
    a, v, y = batch
    feats = _features(model, a, v)
    logits = sig.unimodal_logits(model.head, feats)
    if kind == "ratios":
        return sig.amss_ratios(sig.mutual_information_rate(logits, y, feats), **rule)
    return sig.ogm_coefficients(sig.discrepancy(logits, y), **rule)


def _train(forward, balancer: fastmask.Balancer, opt, data, after_step=None) -> None:
    """The README's bare loop: forward, observe, zero_grad, backward, a bare step."""
    for a, v, y in data:
        loss = F.cross_entropy(forward(a, v), y)
        balancer.observe(y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step()


def _observe(balancer: fastmask.Balancer, model: TwoTower, batch) -> torch.Tensor:
    a, v, y = batch
    out = model(a, v)
    balancer.observe(y)
    return out


@pytest.mark.parametrize(("kind", "rule"), [("ratios", {}), ("ratios", {"temperature": 0.05, "bias": 0.1}),
                                            ("coefficients", {"alpha": 0.8}),
                                            ("coefficients", {"alpha": 0.5, "form": "continuous"})])
def test_one_batch_gives_what_significance_gives(kind, rule):
    model = make_model()
    batch = batches(1, seed=3)[0]
    balancer = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head, **rule)
    _observe(balancer, model, batch)
    values = balancer.take(kind)
    expected = _expected(model, batch, kind, **rule)
    for m in ("audio", "visual"):
        assert values[m].dtype == torch.float32 and values[m].dim() == 0
        assert values[m].item() == pytest.approx(expected[m], abs=1e-6)


def test_micro_batches_pool_like_one_batch():
    model, twin = make_model(), make_model()  # one balancer per model: each forward is observed
    a, v, y = batches(1, seed=4)[0]
    whole = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head)
    halves = fastmask.Balancer({"audio": twin.audio, "visual": twin.visual}, twin.head)
    for kind in ("ratios", "coefficients"):
        _observe(whole, model, (a, v, y))
        _observe(halves, twin, (a[:3], v[:3], y[:3]))
        _observe(halves, twin, (a[3:], v[3:], y[3:]))
        w, h = whole.take(kind), halves.take(kind)
        assert all(w[m].item() == pytest.approx(h[m].item(), abs=1e-6) for m in w)


def test_per_modality_heads_and_fusion_callable():
    torch.manual_seed(0)
    encoders = {"a": nn.Linear(4, 3), "b": nn.Linear(5, 3), "c": nn.Linear(2, 3)}
    heads = fastmask.nn.AuxiliaryHeads({"a": 3, "b": 3, "c": 3}, 4)
    x = {"a": torch.randn(8, 4), "b": torch.randn(8, 5), "c": torch.randn(8, 2)}
    y = torch.randint(0, 4, (8,))
    feats = {m: encoders[m](x[m]).detach() for m in encoders}

    def fusion(f):
        return sum(heads.heads[m](f[m]) for m in f)

    for head, kw, logits in [
        (heads, {}, {m: heads.heads[m](feats[m]) for m in feats}),
        (dict(heads.heads), {}, {m: heads.heads[m](feats[m]) for m in feats}),
        (None, {"fusion": fusion}, sig.unimodal_logits(None, feats, fusion=fusion)),
    ]:
        balancer = fastmask.Balancer(encoders, head, **kw)
        for m in encoders:
            encoders[m](x[m])
        balancer.observe(y)
        got = balancer.take("ratios")
        expected = sig.amss_ratios(sig.mutual_information_rate(logits, y, feats))
        assert all(got[m].item() == pytest.approx(expected[m], abs=1e-6) for m in encoders)
        balancer.remove()


def test_the_bare_loop_of_the_readme_masks_and_modulates():
    for make_opt in (lambda groups, b: fastmask.AMSSPlus(groups, lr=1e-2, balancer=b, seed=1),
                     lambda groups, b: fastmask.OGM(groups, base="sgd", lr=0.05, balancer=b, seed=1)):
        model = make_model()
        balancer = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head, alpha=0.8)
        opt = make_opt(fastmask.modality_groups(model, {"audio": "audio", "visual": "visual"}), balancer)
        assert opt.balancer is balancer
        _train(model, balancer, opt, batches(4, seed=5))
        stats = opt.stats()
        setting = "ratio" if isinstance(opt, fastmask.AMSS) else "coefficient"
        assert all(isinstance(g[setting], torch.Tensor) for g in opt.param_groups if g.get("modality"))
        if isinstance(opt, fastmask.AMSS):
            assert stats["audio"]["expected_fraction"] < 1.0 and stats["visual"]["expected_fraction"] < 1.0
        assert balancer.steps == 4


def test_values_are_read_after_the_closure_and_explicit_values_override():
    model = make_model()
    balancer = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head)
    opt = fastmask.AMSSPlus(model.groups(), lr=1e-2, balancer=balancer, seed=1)
    batch = batches(1, seed=6)[0]

    def closure():  # Lightning's shape: the forward pass runs inside step()
        opt.zero_grad()
        out = _observe(balancer, model, batch)
        loss = F.cross_entropy(out, batch[2])
        loss.backward()
        return loss

    expected = _expected(model, batch, "ratios")
    opt.step(closure)
    assert opt.ratio("audio").item() == pytest.approx(expected["audio"], abs=1e-6)
    opt.step(ratios={"audio": 0.25, "visual": 0.5})  # explicit values: nothing observed is needed
    assert opt.ratio("audio") == 0.25


def test_labels_from_the_model_keyword():
    class HFStyle(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_model()

        def forward(self, a, v, labels=None):
            logits = self.net(a, v)
            return {"loss": F.cross_entropy(logits, labels), "logits": logits}

    model = HFStyle()
    balancer = fastmask.Balancer({"audio": model.net.audio, "visual": model.net.visual}, model.net.head,
                                 labels_from=model)
    opt = fastmask.AMSSPlus(fastmask.modality_groups(model, {"audio": "net.audio", "visual": "net.visual"}),
                            lr=1e-2, balancer=balancer)
    batch = batches(1, seed=7)[0]
    expected = _expected(model.net, batch, "ratios")
    a, v, y = batch
    model(a, v, labels=y)["loss"].backward()
    opt.step()  # what accelerate's wrapper calls: no arguments
    assert opt.ratio("visual").item() == pytest.approx(expected["visual"], abs=1e-6)


def test_window_and_smoothing():
    model, twin = make_model(), make_model()
    data = batches(4, seed=8)
    plain = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head)
    smooth = fastmask.Balancer({"audio": twin.audio, "visual": twin.visual}, twin.head, start=1, end=3,
                               smoothing=0.5)
    raw, got = [], []
    for batch in data:
        _observe(plain, model, batch)
        _observe(smooth, twin, batch)
        raw.append(plain.take("ratios")["audio"].item())
        got.append(smooth.take("ratios")["audio"].item())
    assert got[0] == 1.0 and got[3] == 1.0  # outside [start, end): dense
    assert got[1] == pytest.approx(raw[1], abs=1e-7)
    assert got[2] == pytest.approx(0.5 * raw[1] + 0.5 * raw[2], abs=1e-6)


def test_balancer_state_travels_with_the_optimizer_checkpoint():
    model = make_model()
    balancer = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head, smoothing=0.5)
    opt = fastmask.AMSSPlus(model.groups(), lr=1e-2, balancer=balancer)
    for a, v, y in batches(2, seed=9):
        F.cross_entropy(model(a, v), y).backward()
        balancer.observe(y)
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    other = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head, smoothing=0.5)
    resumed = fastmask.AMSSPlus(model.groups(), lr=1e-2, balancer=other)
    resumed.load_state_dict(sd)
    assert other.steps == 2 and torch.equal(other._smoothed["ratios"], balancer._smoothed["ratios"])
    bad = copy.deepcopy(sd)
    bad["fastmask"]["balancer"]["steps"] = -1
    with pytest.raises(ValueError, match="steps"):
        fastmask.AMSSPlus(model.groups(), lr=1e-2,
                          balancer=fastmask.Balancer({"audio": model.audio, "visual": model.visual},
                                                     model.head)).load_state_dict(bad)


def test_a_step_that_raises_keeps_the_observations():
    model = make_model()
    balancer = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head)
    opt = fastmask.AMSSPlus(model.groups(), lr=1e-2, balancer=balancer)
    batch = batches(1, seed=13)[0]
    _observe(balancer, model, batch)
    F.cross_entropy(model(*batch[:2]), batch[2]).backward()
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"lr \(param group 0\) must be in"):
        opt.step()
    assert balancer.steps == 0 and not opt.state
    opt.param_groups[0]["lr"] = 1e-2
    expected = _expected(model, batch, "ratios")  # before the step moves the model
    opt.step()
    assert opt.ratio("audio").item() == pytest.approx(expected["audio"], abs=1e-6)


def test_nothing_observed_is_a_clear_error():
    model = make_model()
    balancer = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head)
    opt = fastmask.AMSSPlus(model.groups(), lr=1e-2, balancer=balancer)
    a, v, y = batches(1)[0]
    F.cross_entropy(model(a, v), y).backward()
    with pytest.raises(RuntimeError, match="no labels were seen"):
        opt.step()
    model.eval()
    model(a, v)
    balancer._features.clear()
    with pytest.raises(RuntimeError, match="nothing observed"):
        opt.step()
    model.train()
    model.audio(a)
    with pytest.raises(RuntimeError, match="'visual' did not run"):
        balancer.observe(y)


@pytest.mark.parametrize(("build", "match"), [
    (lambda m: fastmask.Balancer({"audio": m.audio}, m.head), "at least two"),
    (lambda m: fastmask.Balancer({"audio": m.audio, "visual": "visual"}, m.head), "must be an nn.Module"),
    (lambda m: fastmask.Balancer({"audio": m.audio, "visual": m.visual}, nn.ReLU()), "concat-fusion nn.Linear"),
    (lambda m: fastmask.Balancer({"audio": m.audio, "visual": m.visual}, m.head, fusion=lambda f: f),
     "either head or fusion"),
    (lambda m: fastmask.Balancer({"audio": m.audio, "visual": m.visual}, {"audio": m.head}), "heads for"),
    (lambda m: fastmask.Balancer({"audio": m.audio, "visual": m.visual}, m.head, temperature=0), "temperature"),
    (lambda m: fastmask.Balancer({"audio": m.audio, "visual": m.visual}, m.head, form="tanh"), "form"),
])
def test_bad_construction(build, match):
    with pytest.raises((TypeError, ValueError), match=match):
        build(make_model())


def test_bad_observations_pool_nothing():
    model = make_model()
    balancer = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head)
    a, v, y = batches(1, seed=10)[0]
    for labels, match in [(y[:3], r"shape \(6,\)"), (y.float(), "integer"), (y + 10, r"in \[0, 5\)")]:
        model(a, v)
        with pytest.raises((TypeError, ValueError), match=match):
            balancer.observe(labels)
        balancer._features.clear()
    _observe(balancer, model, (a, v, y))
    expected = _expected(model, (a, v, y), "ratios")
    assert balancer.take("ratios")["audio"].item() == pytest.approx(expected["audio"], abs=1e-6)


def test_encoder_output_and_head_width_are_checked():
    model = make_model()
    seq = nn.Conv2d(1, 2, 3)
    balancer = fastmask.Balancer({"audio": seq, "visual": model.visual}, model.head)
    with pytest.raises(ValueError, match="pool inside the encoder"):
        seq(torch.randn(2, 1, 8, 8))
    balancer.remove()
    narrow = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, nn.Linear(12, 5))
    model(*batches(1)[0][:2])
    with pytest.raises(ValueError, match="sum to 16, but the head takes 12"):
        narrow.observe(batches(1)[0][2])


def test_pool_turns_an_encoder_output_into_the_features():
    torch.manual_seed(0)

    class Text(nn.Module):  # returns a sequence and a pooled vector, as text encoders do
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 3)

        def forward(self, x):
            seq = self.proj(x)
            return {"last_hidden_state": seq, "pooled": seq[:, 0]}

    text, image, head = Text(), nn.Linear(5, 2), nn.Linear(5, 3)
    balancer = fastmask.Balancer({"text": text, "image": image}, head, pool={"text": lambda out: out["pooled"]})
    x, img, y = torch.randn(6, 7, 4), torch.randn(6, 5), torch.randint(0, 3, (6,))
    feats = {"text": text(x)["pooled"].detach(), "image": image(img).detach()}
    balancer.observe(y)
    logits = sig.unimodal_logits(head, feats)
    expected = sig.amss_ratios(sig.mutual_information_rate(logits, y, feats))
    got = balancer.take("ratios")
    assert all(got[m].item() == pytest.approx(expected[m], abs=1e-6) for m in expected)
    with pytest.raises(ValueError, match="pool names 'audio'"):
        fastmask.Balancer({"text": text, "image": image}, head, pool={"audio": lambda out: out})
    unpooled = fastmask.Balancer({"text": text, "image": image}, head)
    with pytest.raises(ValueError, match=r"Balancer\(pool="):
        text(x)
    unpooled.remove()


def test_modalities_must_match_the_groups_and_one_optimizer_per_balancer():
    model = make_model()
    balancer = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head)
    with pytest.raises(ValueError, match="no param group has"):
        fastmask.AMSSPlus([{"params": model.audio.parameters(), "modality": "audio"},
                           {"params": list(model.visual.parameters()) + list(model.head.parameters())}],
                          balancer=balancer)
    three = [*model.groups(), {"params": [nn.Parameter(torch.zeros(2))], "modality": "text"}]
    with pytest.raises(ValueError, match="does not measure"):
        fastmask.AMSSPlus(three, balancer=balancer)
    with pytest.raises(TypeError, match="fastmask.Balancer"):
        fastmask.AMSSPlus(model.groups(), balancer={"audio": 0.5})
    first = fastmask.AMSSPlus(model.groups(), balancer=balancer)
    with pytest.raises(ValueError, match="already attached"):
        fastmask.OGM(model.groups(), balancer=balancer)
    assert first.balancer is balancer
    with pytest.raises(ValueError, match="'text' is not measured by the attached balancer"):
        first.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "modality": "text"})
    assert len(first.param_groups) == 3


def test_modality_groups():
    model = make_model()
    groups = fastmask.modality_groups(model, {"audio": "audio", "visual": ["visual.0", "visual.3"]},
                                      dense={"weight_decay": 0.0}, audio={"lr": 0.5})
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g.get("modality") for g in groups] == ["audio", "visual", None]
    assert {names[id(p)] for p in groups[0]["params"]} == {n for n in names.values() if n.startswith("audio.")}
    assert {names[id(p)] for p in groups[1]["params"]} == {"visual.0.weight", "visual.0.bias", "visual.3.weight",
                                                            "visual.3.bias"}
    assert {names[id(p)] for p in groups[2]["params"]} == {"head.weight", "head.bias"}
    assert groups[0]["lr"] == 0.5 and groups[2]["weight_decay"] == 0.0
    model.head.bias.requires_grad_(False)
    assert fastmask.modality_groups(model, {"audio": "audio", "visual": "visual"})[2]["params"] == [model.head.weight]
    with pytest.raises(ValueError, match="matches the prefixes of"):
        fastmask.modality_groups(model, {"audio": "audio", "visual": "audio.0"})
    with pytest.raises(ValueError, match="match no trainable parameter.*'audi'"):
        fastmask.modality_groups(model, {"audio": "audi", "visual": "visual"})
    with pytest.raises(ValueError, match="not a modality"):
        fastmask.modality_groups(model, {"audio": "audio"}, text={"lr": 1.0})


def test_compiled_model_trains_without_recompiling():
    torch._dynamo.reset()
    model = make_model()
    balancer = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head)
    opt = fastmask.AMSSPlus(model.groups(), lr=1e-2, balancer=balancer, seed=2)
    compiled = torch.compile(model)
    counts = []
    _train(compiled, balancer, opt, batches(5, seed=11),
           after_step=lambda: counts.append(torch._dynamo.utils.counters["stats"]["unique_graphs"]))
    assert counts[-1] == counts[1], f"recompiled: unique graphs per step {counts}"
    assert balancer.steps == 5


def test_amp_scaler_unscales_in_the_step_or_before_it():
    """GradScaler with the balancer: unscaling inside the step (default) or by the scaler first
    (``unscale_in_step=False``, so that gradients can be clipped in between) step alike."""
    results = []
    for unscale_in_step, clip in ((True, False), (False, False), (False, True)):
        model = make_model()
        balancer = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head)
        opt = fastmask.AMSSPlus(model.groups(), lr=1e-2, balancer=balancer, seed=3, unscale_in_step=unscale_in_step)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for a, v, y in batches(3, seed=12):
            opt.zero_grad()
            loss = F.cross_entropy(model(a, v), y)
            balancer.observe(y)
            scaler.scale(loss).backward()
            if clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
        assert balancer.steps == 3 and opt.stats()["audio"]["realised_fraction"] < 1.0
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(results[0], results[1]))  # 2^k scales: exact either way
    assert not all(torch.equal(a, b) for a, b in zip(results[1], results[2]))  # clipping changed the steps
    with pytest.raises(TypeError, match="unscale_in_step"):
        fastmask.AMSSPlus(make_model().groups(), unscale_in_step=1)


# ---------------------------------------------------------------- never silently wrong (as a user hits it)
class Swapped(TwoTower):
    """Concatenates [visual, audio]: the reverse of the order the balancers below list."""

    def forward(self, a, v):
        return self.head(torch.cat([self.visual(v), self.audio(a)], dim=1))


def test_encoders_listed_out_of_the_heads_order_are_an_error():
    torch.manual_seed(0)
    model = Swapped()
    balancer = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head)
    a, v, y = batches(1, seed=20)[0]
    with pytest.raises(ValueError, match=r"order \['visual', 'audio'\].*listed as \['audio', 'visual'\]"):
        model(a, v)
    balancer.remove()
    right = fastmask.Balancer({"visual": model.visual, "audio": model.audio}, model.head)
    model(a, v)
    right.observe(y)
    logits = sig.unimodal_logits(model.head, _features(model, a, v), ["visual", "audio"])
    expected = sig.amss_ratios(sig.mutual_information_rate(logits, y, _features(model, a, v)))
    got = right.take("ratios")
    assert all(got[m].item() == pytest.approx(expected[m], abs=1e-6) for m in expected)


def test_pooling_that_differs_from_what_the_head_receives_is_an_error():
    class Text(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 3)

        def forward(self, x):
            return self.proj(x)  # [batch, tokens, 3]

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.text, self.image, self.head = Text(), nn.Linear(5, 2), nn.Linear(5, 3)

        def forward(self, x, img):
            return self.head(torch.cat([self.text(x)[:, 0], self.image(img)], dim=1))  # the [CLS] token

    torch.manual_seed(0)
    model = Model()
    x, img = torch.randn(6, 7, 4), torch.randn(6, 5)
    mean = fastmask.Balancer({"text": model.text, "image": model.image}, model.head,
                             pool={"text": lambda out: out.mean(dim=1)})
    with pytest.raises(ValueError, match=r"columns of 'text' differ from what its encoder returned.*\[CLS\]"):
        model(x, img)
    mean.remove()
    cls = fastmask.Balancer({"text": model.text, "image": model.image}, model.head,
                            pool={"text": lambda out: out[:, 0]})
    model(x, img)
    cls.observe(torch.randint(0, 3, (6,)))
    cls.take("ratios")


def test_a_missing_or_extra_modality_at_the_head_is_an_error():
    class Extra(TwoTower):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(20, 5)

        def forward(self, a, v):
            return self.head(torch.cat([self.audio(a), self.visual(v), torch.ones(a.shape[0], 4)], dim=1))

    model = Extra()
    fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head)
    a, v, _ = batches(1)[0]
    with pytest.raises(ValueError, match=r"receives \(6, 20\).*concatenate to \(6, 16\)"):
        model(a, v)
    model = make_model()
    fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head)
    model.audio(a)
    with pytest.raises(RuntimeError, match="the head ran, but the encoder of 'visual' did not run"):
        model.head(torch.zeros(6, 16))


def test_per_modality_heads_are_checked_and_the_check_can_be_turned_off():
    torch.manual_seed(0)
    encoders = {"a": nn.Linear(4, 3), "b": nn.Linear(5, 3)}
    heads = fastmask.nn.AuxiliaryHeads({"a": 3, "b": 3}, 4)
    x = {"a": torch.randn(8, 4), "b": torch.randn(8, 5)}
    balancer = fastmask.Balancer(encoders, heads)
    feats = {m: encoders[m](x[m]) for m in encoders}
    with pytest.raises(ValueError, match="the input of the head of 'a' differ"):
        heads({m: z * 2 for m, z in feats.items()})
    balancer.remove()
    # dropout between the encoders and a concat head changes the features on purpose
    model = make_model()
    drop = nn.Dropout(0.5)
    a, v, y = batches(1)[0]
    checked = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head)
    with pytest.raises(ValueError, match="check_head=False"):
        model.head(drop(torch.cat([model.audio(a), model.visual(v)], dim=1)))
    checked.remove()
    unchecked = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head, check_head=False)
    model.head(drop(torch.cat([model.audio(a), model.visual(v)], dim=1)))
    unchecked.observe(y)
    with pytest.raises(TypeError, match="check_head must be a bool"):
        fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head, check_head=1)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_an_extra_forward_without_gradients_is_not_captured(mode):
    """A metric or logging pass (another batch, even of another size) between the training forward
    and observe(y) leaves the pairing of the labels with their features as it was."""
    model, twin = make_model(), make_model()
    clean = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head)
    logged = fastmask.Balancer({"audio": twin.audio, "visual": twin.visual}, twin.head)
    batch = batches(1, seed=21)[0]
    other = batches(1, seed=22)[0]
    _observe(clean, model, batch)
    a, v, y = batch
    twin(a, v)
    with mode():
        twin(other[0][:4], other[1][:4])  # train mode, another batch of another size
    logged.observe(y)
    want, got = clean.take("ratios"), logged.take("ratios")
    assert all(got[m].item() == want[m].item() for m in want)


def test_a_second_training_forward_before_observe_is_an_error():
    model = make_model()
    balancer = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head)
    (a, v, y), (a2, v2, _) = batches(2, seed=23)
    model(a, v)
    with pytest.raises(RuntimeError, match="second training forward pass before observe"):
        model(a2, v2)


def test_activation_checkpointing_recomputation_is_not_a_second_forward():
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(TwoTower):
        def forward(self, a, v):
            feats = [checkpoint(self.audio, a, use_reentrant=False), checkpoint(self.visual, v, use_reentrant=False)]
            return self.head(torch.cat(feats, dim=1))

    torch.manual_seed(0)
    model = Checkpointed()
    balancer = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head)
    opt = fastmask.AMSSPlus(model.groups(), lr=1e-2, balancer=balancer, seed=0)
    _train(model, balancer, opt, batches(3, seed=24))
    assert balancer.steps == 3


def _nan_batch(batch):
    a, v, y = batch
    a = a.clone()
    a[0, 0, 0, 0] = float("nan")
    return a, v, y


@pytest.mark.parametrize("method", ["ogm", "amss+"])
def test_a_non_finite_batch_leaves_no_trace(method):
    """One batch whose audio input holds a NaN: a warning naming 'audio' (once), the last good
    values for that step, the step count and smoothed values unchanged, clean steps after it as
    if it had not happened, and finite values in the checkpoint."""
    data = batches(5, seed=25)
    runs = {}
    for with_nan in (False, True):
        model = make_model()
        balancer = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head, smoothing=0.9)
        groups = model.groups()
        opt = (fastmask.OGM(groups, base="sgd", lr=0.05, balancer=balancer, seed=0) if method == "ogm"
               else fastmask.AMSSPlus(groups, lr=1e-2, balancer=balancer, seed=0))
        values = []
        for i, batch in enumerate(data):
            if with_nan and i == 2:
                with pytest.warns(RuntimeWarning, match=r"statistics of 'audio' are not finite.*dropped"):
                    _train(model, balancer, opt, [_nan_batch(batch)])
                assert balancer.steps == 2
                assert opt.param_groups[0][opt.SETTING_LABEL].item() == values[-1]  # the last good value
                continue
            _train(model, balancer, opt, [batch])
            values.append(opt.param_groups[0][opt.SETTING_LABEL].item())
        runs[with_nan] = (values, balancer)
    (clean, _), (values, balancer) = runs[False], runs[True]
    assert values[:2] == clean[:2] and len(values) == 4 and all(v == v for v in values)
    assert balancer.stats() == {"steps": 4, "dropped_batches": 1, "non_finite": {"audio": 1, "visual": 0},
                                "fallback_steps": 1}
    state = balancer.state_dict()
    assert state["steps"] == 4 and all(bool(torch.isfinite(t).all()) for t in state["smoothed"].values())


def test_later_non_finite_batches_are_counted_without_a_warning_and_the_fallback_comes_first():
    import warnings

    model = make_model()
    balancer = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head, fallback=0.7)
    opt = fastmask.AMSSPlus(model.groups(), lr=1e-2, balancer=balancer, seed=0)
    first, second = batches(2, seed=26)
    with pytest.warns(RuntimeWarning, match="'audio'"):
        _train(model, balancer, opt, [_nan_batch(first)])
    assert opt.ratio("audio").item() == pytest.approx(0.7) and balancer.steps == 0  # the rule's fallback
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(model, balancer, opt, [_nan_batch(second)])
    assert balancer.stats()["dropped_batches"] == 2 and balancer.stats()["fallback_steps"] == 2


def test_a_step_that_raises_after_taking_the_values_changes_nothing_in_the_balancer(monkeypatch):
    model = make_model()
    balancer = fastmask.Balancer({"audio": model.audio, "visual": model.visual}, model.head, smoothing=0.5)
    opt = fastmask.AMSSPlus(model.groups(), lr=1e-2, balancer=balancer, seed=0)
    batch = batches(1, seed=27)[0]
    expected = _expected(model, batch, "ratios")
    _observe(balancer, model, batch)
    F.cross_entropy(model(*batch[:2]), batch[2]).backward()

    def broken(*args, **kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(fastmask.ops, "masked_step_", broken)
    with pytest.raises(RuntimeError, match="kernel failed"):
        opt.step()
    assert balancer.steps == 0 and balancer.state_dict()["smoothed"] == {} and balancer._observed == 1
    monkeypatch.undo()
    opt.step()
    assert balancer.steps == 1 and opt.ratio("audio").item() == pytest.approx(expected["audio"], abs=1e-6)
