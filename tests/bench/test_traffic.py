"""The GPU step's traffic and launches, counted in Triton's interpreter and pinned to budgets.

Counts, not timings: every number here is exact and machine-independent (bench/traffic.py),
so a change that adds bytes, launches or device ops to the step fails here.
"""

import pytest
import torch

from tests.conftest import INTERPRETED

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="counted in Triton's interpreter (CPU tensors)")

if INTERPRETED:
    import triton
    import triton.language as tl

    from fastmask.bench import traffic

    @triton.jit
    def _strided_copy(src, dst, n, STRIDE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inb = offs * STRIDE < n
        tl.store(dst + offs * STRIDE, tl.load(src + offs * STRIDE, mask=inb), mask=inb)


@pytest.mark.parametrize("stride, sectors_per_load", [(1, 1 / 8), (8, 1.0), (16, 1.0)])
def test_sectors_are_counted_as_a_gpu_moves_them(stride, sectors_per_load):
    """fp32: contiguous loads share a 32-byte sector 8 to 1; a stride of 8 or more touches a
    sector per load. Host ops outside the launch are counted; those inside it are not."""
    n = 4096
    src, dst = torch.randn(n), torch.zeros(n)
    loads = n // stride
    with traffic.count() as counted:
        torch.add(src, 1.0)
        torch.empty(3)
        _strided_copy[(1,)](src, dst, n, STRIDE=stride, BLOCK=loads)
    kernel = counted.kernels["_strided_copy"]
    assert kernel.launches == 1
    # allocations may add a sector at each end when a tensor does not start on a sector
    assert loads * sectors_per_load <= kernel.read_sectors <= loads * sectors_per_load + 1
    assert loads * sectors_per_load <= kernel.write_sectors <= loads * sectors_per_load + 1
    assert dict(counted.device_ops) == {"add": 1} and counted.allocations == 1
    assert torch.equal(dst[::stride], src[::stride])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", list(traffic.VARIANTS) if INTERPRETED else [])
def test_step_within_its_budget(variant, dtype):
    row = traffic.traffic_row(variant, dtype)
    budget = traffic.BUDGETS[variant][row.dtype]
    assert row.bytes_per_element <= budget["bytes_per_element"], row.per_kernel
    assert row.launches_per_batch <= budget["launches"]
    assert row.device_ops_per_batch <= budget["device_ops"], row.device_ops
    assert row.host_syncs == 0


@pytest.mark.parametrize("variant", ["grad2", "row", "ogm-ge"])
def test_launches_and_ops_do_not_grow_with_the_tensors(variant):
    """One launch per kernel and batch, whatever the number of tensors in it."""
    one = traffic.count_step(variant, shapes=[(16, 8)])
    several = traffic.count_step(variant, shapes=traffic.SEVERAL * 3)
    assert one.launches == several.launches == traffic.BUDGETS[variant]["float32"]["launches"]
    assert one.device_ops == several.device_ops


def test_row_units_skip_unselected_rows():
    """Row units with "freeze": pass 2 reads and writes only the selected rows (about half at
    ratio 0.5), so the whole step moves less than torch's fused AdamW (28 B per element)."""
    counted = traffic.count_step("row")
    numel = traffic.SHAPE[0] * traffic.SHAPE[1]
    dense_pass2 = traffic.count_step("dense").kernels["pass2"]
    pass2 = counted.kernels["pass2"]
    assert 0.3 * dense_pass2.read_sectors < pass2.read_sectors < 0.7 * dense_pass2.read_sectors
    assert 0.3 * dense_pass2.write_sectors < pass2.write_sectors < 0.7 * dense_pass2.write_sectors
    assert sum(counted.bytes_per_element(numel)) < traffic.fused_adamw_bytes(torch.float32)


def test_cli_prints_the_table_and_writes_the_json(tmp_path, capsys):
    import json

    from fastmask.cli import main

    assert main(["bench", "--traffic", "--variants", "dense", "--json", str(tmp_path / "t.json")]) == 0
    printed = capsys.readouterr().out
    assert "MODEL, not a measurement" in printed and "| dense | float32 |" in printed
    saved = json.loads((tmp_path / "t.json").read_text())
    assert [(r["variant"], r["dtype"]) for r in saved["rows"]] == [("dense", "float32"), ("dense", "bfloat16")]
    assert saved["bandwidth_tbps"] == traffic.H200_COPY_TBPS
    with pytest.raises(SystemExit, match="unknown \\['rows'\\] with --traffic"):
        main(["bench", "--traffic", "--variants", "rows"])


@pytest.mark.parametrize("variant", ["dense", "ogm-ge"])
def test_batches_without_water_filling_meet_the_launch_floor(variant):
    """DESIGN §5: per batch at most 3 launches and 3 other device ops besides allocations."""
    counted = traffic.count_step(variant, shapes=traffic.SEVERAL)
    assert counted.launches <= 3 and sum(counted.device_ops.values()) <= 3, dict(counted.device_ops)


def test_bad_model_arguments_and_variants_are_refused():
    from fastmask.cli import main

    with pytest.raises(SystemExit, match="--bandwidth-tbps must be a positive number"):
        main(["bench", "--traffic", "--bandwidth-tbps", "0"])
    with pytest.raises(SystemExit, match="--launch-us must be >= 0"):
        main(["bench", "--traffic", "--launch-us", "-1"])
    with pytest.raises(ValueError, match="variant must be one of"):
        traffic.count_step("rows")
