"""fastmask.reference.spec: the kernel config derives every term once from a StepConfig."""

from fastmask.reference.spec import BASE_IDS, HIST_BINS, RESCALE_IDS, SUM_COLS, KernelConfig, StepConfig


def test_derived_terms_are_computed_once_here():
    dense = KernelConfig.from_step(StepConfig(masked="freeze", sampling="exact", coefficient=0.5, modulate="update"),
                                   ema=False)
    assert not dense.masked and not dense.freeze and not dense.exact and dense.mask_mode == 0
    assert dense.grad_coefficient == 1.0 and dense.update_coefficient == 0.5 and dense.modulate_update
    assert dense.rescale == RESCALE_IDS["none"] and dense.base == BASE_IDS["adamw"]
    rows = KernelConfig.from_step(StepConfig(ratio=0.5, granularity="row", unbiased=True), ema=False)
    assert rows.masked and rows.freeze and rows.row and rows.mask_mode == 2 and rows.rescale == RESCALE_IDS["ht"]
    elements = KernelConfig.from_step(StepConfig(base="sgd", momentum=0.9, ratio=0.5, coefficient=0.8), ema=True)
    assert elements.mask_mode == 1 and elements.has_momentum and elements.grad_coefficient == 0.8
    assert not elements.modulate_update
    assert not KernelConfig.from_step(StepConfig(base="sgd"), ema=False).has_momentum
    water = KernelConfig.from_step(StepConfig(ratio=0.5), ema=False)
    assert water.water_filling and water.sums_width == SUM_COLS + HIST_BINS
    for sampling in ("uniform", "exact"):
        assert not KernelConfig.from_step(StepConfig(ratio=0.5, sampling=sampling), ema=False).water_filling
    assert KernelConfig.from_step(StepConfig(ratio=0.5, sampling="exact"), ema=False).sums_width == SUM_COLS
    assert not KernelConfig.from_step(StepConfig(), ema=False).water_filling
