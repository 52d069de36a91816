"""fastmask.reference.spec: StepConfig derives every term the kernels read once, and hands the
C++ kernels those terms as kernel_fields."""

import math

import torch

from fastmask.reference.spec import BASE_IDS, HIST_BINS, RESCALE_IDS, SUM_COLS, StepConfig


def test_derived_terms_are_computed_once_here():
    dense = StepConfig(masked="freeze", sampling="exact", coefficient=0.5, modulate="update")
    assert not dense.is_masked and not dense.freeze and not dense.exact and dense.mask_mode == 0
    assert dense.grad_coefficient == 1.0 and dense.modulate_update
    assert dense.rescale_id == RESCALE_IDS["none"] and dense.base_id == BASE_IDS["adamw"]
    rows = StepConfig(ratio=0.5, granularity="row", unbiased=True)
    assert rows.is_masked and rows.freeze and rows.row and rows.mask_mode == 2 and rows.rescale_id == RESCALE_IDS["ht"]
    elements = StepConfig(base="sgd", momentum=0.9, ratio=0.5, coefficient=0.8)
    assert elements.mask_mode == 1 and elements.has_momentum and elements.grad_coefficient == 0.8
    assert not elements.modulate_update and elements.poisson
    assert not StepConfig(base="sgd").has_momentum
    assert not StepConfig(ratio=0.5, masked="zero_grad").freeze
    water = StepConfig(ratio=0.5)
    assert water.water_filling and water.sums_width == SUM_COLS + HIST_BINS
    for sampling in ("uniform", "exact"):
        assert not StepConfig(ratio=0.5, sampling=sampling).water_filling
    assert StepConfig(ratio=0.5, sampling="exact").sums_width == SUM_COLS
    assert StepConfig(ratio=0.5, sampling="exact").mask_mode == 2
    assert not StepConfig().water_filling


def test_kernel_fields_are_the_derived_terms_with_tensor_settings_read_on_the_device():
    cfg = StepConfig(base="adam", lr=0.01, ratio=0.3, unbiased=True, rescale="legacy", coefficient=0.7,
                     modulate="update", ge_noise=True, seed=7)
    fields = cfg.kernel_fields(ema=True)
    assert fields["base_id"] == BASE_IDS["adam"] and fields["rescale_id"] == RESCALE_IDS["legacy"]
    assert fields["lr"] == 0.01 and fields["ratio"] == 0.3 and fields["update_coefficient"] == 0.7
    assert fields["grad_coefficient"] == 1.0 and fields["modulate_update"] and fields["ge_noise"]
    assert fields["is_masked"] and fields["water_filling"] and fields["ema"] and fields["seed"] == 7
    on_device = StepConfig(lr=torch.tensor(0.01), ratio=torch.tensor(0.5), coefficient=torch.tensor(0.5))
    fields = on_device.kernel_fields(ema=False)
    assert fields["lr"] == 0.0  # the kernels read the lr tensor
    assert math.isnan(fields["ratio"]) and math.isnan(fields["grad_coefficient"])
    assert fields["is_masked"] and not fields["ema"]  # a ratio tensor may sample: decided on the device


def test_the_former_name_of_a_batch_still_works_with_a_warning():
    import pytest

    import fastmask.reference as reference
    from fastmask.reference.spec import TensorBatch

    with pytest.warns(DeprecationWarning, match="renamed TensorBatch"):
        assert reference.TensorGroup is TensorBatch
    with pytest.raises(AttributeError, match="no attribute 'TensorGrop'"):
        reference.TensorGrop
