"""The Triton water level (kernels/sampling.py) is ``sampling.water_level``, bit for bit: its exact
masses, their rounding (carry chains included) and the level of adversarial histograms."""

import pytest
import torch

from fastmask.reference import sampling
from tests.conftest import DEVICE, FAST_BACKENDS

pytestmark = pytest.mark.skipif("triton" not in FAST_BACKENDS, reason="Triton cannot run here")

if "triton" in FAST_BACKENDS:
    import triton
    import triton.language as tl

    from kernels.sampling import MASS_LIMBS, _mass_to_float, water_level

    @triton.jit
    def _round_masses(limbs, out, LIMBS: tl.constexpr):
        i = tl.program_id(0)
        tl.store(out + i, _mass_to_float(tl.load(limbs + i * LIMBS + tl.arange(0, LIMBS))))

    @triton.jit
    def _levels(hist, ratio_ptr, min_prob_ptr, events_x, events_a, events_c, n_events, n_halvings, out,
                WIDTH: tl.constexpr):
        t = tl.program_id(0)
        x, p0 = water_level(hist + t * WIDTH, tl.load(ratio_ptr), min_prob_ptr, events_x, events_a, events_c,
                            n_events, n_halvings)
        tl.store(out + 2 * t, x)
        tl.store(out + 2 * t + 1, p0.to(tl.float64))


def _adversarial_limbs() -> torch.Tensor:
    """Non-negative limbs below 2^40 (sampling.MASS_LIMBS of them, a mass below 2^312), with the carry chains an
    adder must look ahead through: runs of 2^24 - 1 above a limb that carries."""
    gen = torch.Generator().manual_seed(3)
    full = (1 << sampling.MASS_LIMB_BITS) - 1
    rows = [torch.zeros(sampling.MASS_LIMBS, dtype=torch.int64)]
    rows += [torch.randint(0, 1 << 40, (sampling.MASS_LIMBS,), generator=gen) for _ in range(4)]
    rows += [torch.randint(0, 1 << 24, (sampling.MASS_LIMBS,), generator=gen) for _ in range(4)]
    for start, length, carry in ((0, 12, 1), (2, 6, 1 << 30), (5, 7, full + 1), (0, 3, 5)):
        row = torch.zeros(sampling.MASS_LIMBS, dtype=torch.int64)
        row[start + 1 : start + 1 + length] = full
        row[start] = carry << sampling.MASS_LIMB_BITS if carry < full else carry
        rows.append(row)
    one = torch.zeros(sampling.MASS_LIMBS, dtype=torch.int64)
    one[-1] = 1
    limbs = torch.stack(rows + [one])
    limbs[:, -1] %= 1 << 20  # a mass below 2^312 units: the top limb holds the rest without overflowing
    return limbs


def test_mass_rounding_is_the_references_through_every_carry_chain():
    limbs = _adversarial_limbs()
    padded = torch.zeros(len(limbs), MASS_LIMBS.value, dtype=torch.int64)
    padded[:, : sampling.MASS_LIMBS] = limbs
    out = torch.empty(len(limbs), dtype=torch.float64, device=DEVICE)
    _round_masses[(len(limbs),)](padded.to(DEVICE), out, LIMBS=MASS_LIMBS.value)
    assert torch.equal(out.cpu(), sampling.mass_to_float(limbs))


def _histograms() -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    cases = [torch.exp(torch.randn(2000, generator=gen) * scale) for scale in (0.5, 2, 8, 20)]
    cases += [torch.rand(500, generator=gen) * 1e-38, torch.tensor([0.7]), torch.zeros(5),
              torch.cat((torch.tensor([1e30]), torch.rand(999, generator=gen))),
              torch.cat((torch.rand(10, generator=gen), torch.zeros(990))), torch.tensor([float("inf"), 1.0, 0.0])]
    hist = torch.stack([sampling.unit_histogram(s) for s in cases])
    hist[3, 1000] += 2.0**40  # a count far beyond any tensor here: the masses stay exact
    return hist


@pytest.mark.parametrize("min_prob", [0.0, 0.01, 0.2])
@pytest.mark.parametrize("ratio", [0.001, 0.3, 0.95])
def test_triton_level_is_the_reference_bit_for_bit(ratio, min_prob):
    hist = _histograms()
    _, x, a, c = sampling.level_events(min_prob, DEVICE)
    out = torch.empty(len(hist), 2, dtype=torch.float64, device=DEVICE)
    _levels[(len(hist),)](hist.to(DEVICE), torch.tensor([ratio], dtype=torch.float32, device=DEVICE),
                          torch.tensor([min_prob], dtype=torch.float64, device=DEVICE), x, a, c, x.numel(),
                          x.numel().bit_length(), out, WIDTH=hist.shape[1])
    assert torch.equal(out.cpu(), sampling.water_level(hist, ratio, min_prob))
