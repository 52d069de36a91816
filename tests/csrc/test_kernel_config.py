"""The kernel config: StepConfig.kernel_fields and the C++ fastmask::KernelConfig
(FASTMASK_KERNEL_CONFIG_FIELDS, csrc/fastmask_math.h) declare the same fields, and every field
reaches C++ typed."""

import pytest

from fastmask.backends import cpp
from fastmask.backends.native import native_config
from fastmask.reference.spec import BASE_IDS, RESCALE_IDS, Shard, StepConfig, TensorBatch

pytestmark = pytest.mark.skipif(cpp.EXTENSION.module() is None, reason="the cpp backend cannot be built here")


# Python value type -> the C++ types it may be declared as
CPP_TYPES = {int: {"int", "int64_t", "uint64_t"}, float: {"double"}, bool: {"bool"}}


@pytest.mark.parametrize("cfg", [StepConfig(), StepConfig(ratio=0.5, granularity="row", seed=3)])
def test_cpp_declares_the_python_fields_in_order_with_matching_types(cfg):
    declared = cpp.EXTENSION.module().KERNEL_CONFIG_FIELDS
    python = cfg.kernel_fields(ema=False)
    assert [name for name, _ in declared] == list(python)
    for name, cpp_type in declared:
        assert cpp_type in CPP_TYPES[type(python[name])], (name, cpp_type, type(python[name]))
    assert dict(declared)["seed"] == "uint64_t"  # the 64-bit seed is unsigned in C++


def test_cpp_enum_values_equal_the_python_ids():
    ext = cpp.EXTENSION.module()
    assert ext.BASE_IDS == BASE_IDS
    assert ext.RESCALE_IDS == RESCALE_IDS


@pytest.mark.parametrize("cfg", [
    StepConfig(),
    StepConfig(base="sgd", lr=0.1, momentum=0.9, nesterov=True, ratio=0.3, granularity="row", sampling="uniform",
               unbiased=True, rescale="legacy", masked="zero_grad", seed=2**63 + 5),
    StepConfig(base="adam", ratio=0.5, sampling="exact", coefficient=0.7, modulate="update", ge_noise=True),
])
def test_every_kernel_config_field_reaches_cpp_typed(cfg):
    import torch

    p = torch.zeros(4, 3)
    batch = TensorBatch([p], [p], [torch.zeros(())], [0], shards=[Shard(torch.Size((8, 3)), 12)])
    config, shards = native_config(cpp.EXTENSION.module(), cfg, True, batch)
    for name, value in cfg.kernel_fields(ema=True).items():
        assert getattr(config, name) == value, name
    rows = cfg.granularity == "row"  # the shard starts at row 4 (element 12) of an 8 x 3 tensor
    assert shards.first_units == [4 if rows else 12] and shards.full_units == [8 if rows else 24]
    assert shards.first_elements == [12] and shards.full_numels == [24]


def test_cpp_config_rejects_unknown_fields_and_wrong_types():
    config = cpp.EXTENSION.module().KernelConfig()
    with pytest.raises(AttributeError):
        config.granularty = 1
    with pytest.raises(TypeError):
        config.base_id = "adamw"


def test_configs_are_kept_per_value_and_made_anew_for_new_values():
    import torch

    from fastmask.reference.spec import step_config

    ext = cpp.EXTENSION.module()
    batch = TensorBatch([torch.zeros(3)], [torch.zeros(3)], [torch.zeros(())], [0])
    fields = dict(base="adamw", lr=1e-3, ratio=0.5, unbiased=True, seed=7)
    cfg = step_config(fields)
    assert step_config(dict(fields)) is cfg  # equal fields: the same StepConfig
    kept, _ = native_config(ext, cfg, False, batch)
    assert native_config(ext, StepConfig(**fields), False, batch)[0] is kept  # equal by value, another object
    # any field that changes (a scheduler's lr, a new ratio, the batch's EMA) gets its own config
    for changed, ema in ((dict(fields, lr=5e-4), False), (dict(fields, ratio=0.25), False), (fields, True)):
        config, _ = native_config(ext, step_config(changed), ema, batch)
        assert config is not kept
        for name, value in StepConfig(**changed).kernel_fields(ema).items():
            assert getattr(config, name) == value, name
    assert (kept.lr, kept.ratio, kept.ema) == (1e-3, 0.5, False)  # the kept config was not written
    # a tensor setting is read from memory by the kernels: never kept
    tensor_lr = dict(fields, lr=torch.tensor(1e-3))
    assert step_config(tensor_lr) is not step_config(tensor_lr)
    tensor_beta = dict(fields, beta1=torch.tensor(0.9))  # a value the optimizers' checks would have made a float
    assert step_config(tensor_beta) is not step_config(tensor_beta)
    assert native_config(ext, step_config(tensor_lr), False, batch)[0] is not native_config(
        ext, step_config(tensor_lr), False, batch)[0]
