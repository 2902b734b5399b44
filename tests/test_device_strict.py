"""Device-strict mode (testing/device_strict.py): it must fail where NCCL or CUDA would, and pass the rest.

The training steps of every table layout run under it in tests/test_training.py
(`test_training_steps_are_device_strict`); here the guard itself, on 2 gloo processes.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engram_pretrain.testing.distributed import run_distributed


def _guard_job(rank: int, world: int) -> dict[str, Any]:
    import torch.distributed as dist

    from engram_pretrain.testing.device_strict import STRICT_DEVICE, DeviceStrictError, device_strict, is_host

    out: dict[str, Any] = {}
    host_group = dist.new_group(ranks=list(range(world)), backend="gloo")
    weight = torch.nn.Parameter(torch.ones(3, 2, dtype=torch.float64))  # made before the mode: on the device
    with device_strict(host_groups=[host_group]) as strict:
        totals = torch.zeros(3, dtype=torch.float64)  # deliberately made on the host
        out["host"], out["host_device"] = is_host(totals), str(totals.device)
        try:
            dist.all_reduce(totals)
        except DeviceStrictError as err:
            out["collective_error"] = str(err)
        moved = totals.to(STRICT_DEVICE) + 1.0  # on the training device: NCCL takes it
        dist.all_reduce(moved)
        out["reduced"] = moved.tolist()
        out["moved_device"], out["weight_device"] = str(moved.device), str(weight.device)
        try:
            weight.sum(dim=1) * torch.ones(3, dtype=torch.float64)  # host [3] with a device tensor
        except DeviceStrictError as err:
            out["mixed_error"] = str(err)
        scale = torch.tensor(2.0, dtype=torch.float64)  # a 0-dim host scalar mixes, as CUDA allows
        out["scalar_ok"] = not is_host(weight * scale)
        like = torch.zeros(2, device=weight.device)  # device=x.device places like x
        out["like_host"] = is_host(like)
        rows = weight.to("cpu")  # a host copy: a view, autograd intact
        (rows * 3.0).sum().backward()
        out["grad"] = weight.grad.tolist()
        out["rows_host"], out["host_op"] = is_host(rows), is_host(rows.detach() * 2)
        dist.all_reduce(rows.detach().clone(), group=host_group)  # host tensors on a host group: allowed
        try:
            dist.all_reduce(moved, group=host_group)
        except DeviceStrictError as err:
            out["host_group_error"] = str(err)
        out["checked"] = strict.mode.collectives_checked
        out["syncs"] = sorted(strict.sync_sites)
    return out


@pytest.fixture(scope="module")
def guard() -> list[dict[str, Any]]:
    return run_distributed(_guard_job, 2)


def test_a_host_tensor_in_all_reduce_fails_with_the_calling_line(guard: list[dict[str, Any]]) -> None:
    for r in guard:
        assert r["host"] and r["host_device"] == "cpu"
        err = r["collective_error"]
        assert err.startswith("dist.all_reduce on the default group got host tensor [3] float64")
        assert "zeros() at test_device_strict.py:_guard_job: totals = torch.zeros(3, dtype=" in err
        assert "at test_device_strict.py:_guard_job: dist.all_reduce(totals)" in err


def test_training_device_tensors_pass_and_reduce(guard: list[dict[str, Any]]) -> None:
    for r in guard:
        assert r["reduced"] == [2.0, 2.0, 2.0]  # (0 + 1) summed over 2 ranks: the collective ran
        assert r["moved_device"] == r["weight_device"] == "cpu:0"
        assert r["checked"] == 2  # the device all-reduce and the host-group one


def test_mixed_ops_fail_like_cuda_and_scalars_mix(guard: list[dict[str, Any]]) -> None:
    for r in guard:
        assert "mul: host tensor [3] float64" in r["mixed_error"]
        assert "training-device tensor [3] float64" in r["mixed_error"]
        assert r["scalar_ok"] and not r["like_host"]


def test_host_copies_keep_autograd_and_propagate(guard: list[dict[str, Any]]) -> None:
    for r in guard:
        assert r["grad"] == [[3.0, 3.0]] * 3
        assert r["rows_host"] and r["host_op"]


def test_host_groups_take_host_tensors_only(guard: list[dict[str, Any]]) -> None:
    for r in guard:
        assert "dist.all_reduce on a host group got a training-device tensor" in r["host_group_error"]


def test_reads_of_host_tensors_are_no_syncs(guard: list[dict[str, Any]]) -> None:
    for r in guard:
        # moved.tolist() reads a device tensor; weight.grad.tolist() too (a gradient of a device tensor)
        assert all(s.startswith("<outside engram_pretrain>") for s in r["syncs"]), r["syncs"]
