"""Expert parallelism: the all-to-all dispatcher against fp64 loop references on 2 and 4 gloo ranks, and
EP=2 (EP=4) training on the real DeepSpeed engine against EP=1 (same losses, gradients and weights), resume
with EP=2; the same with an expert count that EP does not divide (uneven placement, docs/expert_parallel.md).

References: a per-token fp64 loop over the full expert set (differentiated by autograd) and the local
dispatcher with all experts; the trainer's EP=1 run is the reference of the EP=2 run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from test_training import _assert_exact_resume, _close, _state, _straight_vs_resumed, _trainer, tiny_config

from engram_pretrain.config import ConfigError, load_config
from engram_pretrain.model.config import MoEConfig
from engram_pretrain.model.moe import GroupedExperts, LocalExpertDispatcher, MoE
from engram_pretrain.parallel.expert_parallel import check_expert_parallel_config
from engram_pretrain.parallel.groups import expert_counts, expert_parallel_ranks
from engram_pretrain.testing.datasets import make_dataset_dir
from engram_pretrain.testing.distributed import run_distributed
from engram_pretrain.train.checkpoint import EXPERTS_DIR, check_expert_checkpoint, checkpoint_ep_size

D, H, E, K = 6, 5, 4, 2


# ----------------------------------------------------------------------------- layout, config, init

def test_group_layout_is_consecutive_ep_and_strided_expert_dp() -> None:
    ep, edp = expert_parallel_ranks(8, 2)  # DeepSpeed's documented E + D example
    assert ep == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert edp == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert expert_parallel_ranks(4, 4) == ([[0, 1, 2, 3]], [[0], [1], [2], [3]])
    assert expert_parallel_ranks(3, 1) == ([[0], [1], [2]], [[0, 1, 2]])
    with pytest.raises(ValueError, match="divide"):
        expert_parallel_ranks(6, 4)


def test_config_checks_name_parallel_ep_size() -> None:
    cfg = load_config(None, ["model.moe.num_routed_experts=4", "parallel.ep_size=2"])
    check_expert_parallel_config(cfg, world_size=4, zero_stage=2)
    with pytest.raises(ConfigError, match=r"parallel\.ep_size: 2 must divide the world size 3"):
        check_expert_parallel_config(cfg, world_size=3, zero_stage=2)
    with pytest.raises(ConfigError, match=r"parallel\.ep_size.*ZeRO stage 3"):
        check_expert_parallel_config(cfg, world_size=2, zero_stage=3)
    check_expert_parallel_config(load_config(None, ["parallel.ep_size=1"]), world_size=3, zero_stage=3)
    # ep_size need not divide the expert count (uneven placement), but every EP rank needs an expert
    uneven = load_config(None, ["model.moe.num_routed_experts=5", "parallel.ep_size=2"])
    check_expert_parallel_config(uneven, world_size=4, zero_stage=1)
    check_expert_parallel_config(load_config(None, ["model.moe.num_routed_experts=4", "parallel.ep_size=3"]),
                                 world_size=3, zero_stage=0)
    with pytest.raises(ConfigError, match=r"parallel\.ep_size: 5 exceeds model\.moe\.num_routed_experts=4"):
        load_config(None, ["model.moe.num_routed_experts=4", "parallel.ep_size=5"])
    uneven.parallel.ep_size = 8
    with pytest.raises(ConfigError, match=r"parallel\.ep_size: 8 exceeds model\.moe\.num_routed_experts=5"):
        check_expert_parallel_config(uneven, world_size=8, zero_stage=2)


def test_checkpoint_ep_size_must_match(tmp_path: Path) -> None:
    assert checkpoint_ep_size(tmp_path) == 1
    check_expert_checkpoint(tmp_path, 1)
    with pytest.raises(ValueError, match=r"parallel\.ep_size=1; resuming with parallel\.ep_size=2"):
        check_expert_checkpoint(tmp_path, 2)
    (tmp_path / EXPERTS_DIR).mkdir()
    (tmp_path / EXPERTS_DIR / "meta.json").write_text('{"ep_size": 2}')
    check_expert_checkpoint(tmp_path, 2)
    with pytest.raises(ValueError, match=r"parallel\.ep_size=2; resuming with parallel\.ep_size=4"):
        check_expert_checkpoint(tmp_path, 4)


class _ShardOf:
    """A dispatcher stand-in that only says which experts this rank holds."""

    def __init__(self, count: int, offset: int) -> None:
        self.count, self.offset = count, offset

    def local_experts(self, num_experts: int) -> tuple[int, int]:
        return self.count, self.offset

    def __call__(self, *args: Any) -> torch.Tensor:
        raise NotImplementedError


def test_expert_shards_are_slices_of_the_unsharded_init() -> None:
    cfg = MoEConfig(num_routed_experts=E, top_k=K, expert_dim=H, num_shared_experts=1)
    torch.manual_seed(5)
    full = MoE(D, cfg, init_std=0.5)
    after_full = torch.randn(3)
    for offset in (0, 2):
        torch.manual_seed(5)
        shard = MoE(D, cfg, init_std=0.5, dispatcher=_ShardOf(2, offset))
        assert torch.equal(torch.randn(3), after_full)  # same RNG stream after the layer
        assert (shard.experts.num_experts, shard.experts.expert_offset) == (2, offset)
        assert shard.num_experts == E and shard.load_accum.shape == (E,)  # the router sees all experts
        assert shard.router.weight.shape == (E, D)
        for w in ("w1", "w3", "w2"):
            assert torch.equal(getattr(shard.experts, w), getattr(full.experts, w)[offset:offset + 2])
        for name in ("router.weight", "shared_experts.w1.weight", "shared_experts.w2.weight"):
            assert torch.equal(shard.get_parameter(name), full.get_parameter(name)), name
    with pytest.raises(ValueError, match="do not fit"):
        GroupedExperts(D, H, 3, 0.5, expert_offset=2, num_global_experts=4)


# ----------------------------------------------------------------------------- dispatcher on 2 and 4 ranks

CASES = {
    # name: (tokens of each rank, experts the router may pick); E = 4 experts, EP 2: [0, 2) [2, 4)
    "random": ((7, 5), range(E)),
    "idle_rank1_experts": ((6, 4), range(2)),  # EP rank 1 holds experts 2, 3: they receive no token at all
    "rank1_no_tokens": ((6, 0), range(E)),
    "all_to_rank1": ((5, 3), range(2, E)),  # EP rank 0's experts idle, rank 1 gets everything
}
E_UNEVEN = 5
UNEVEN_CASES = {  # E = 5 experts, EP 2: rank 0 holds [0, 3), rank 1 [3, 5)
    "uneven_random": ((7, 5), range(E_UNEVEN)),
    "uneven_idle_rank1_experts": ((6, 4), range(3)),
    "uneven_rank1_no_tokens": ((6, 0), range(E_UNEVEN)),
    "uneven_all_to_rank1": ((5, 3), range(3, E_UNEVEN)),
}
E_FOUR = 7
FOUR_RANK_CASES = {  # E = 7 experts on 4 ranks: EP 4 [0, 2) [2, 4) [4, 6) [6, 7); EP 2 [0, 4) [4, 7)
    "four_random": ((5, 3, 4, 2), range(E_FOUR)),
    "four_last_expert_idle": ((4, 3, 5, 2), range(E_FOUR - 1)),  # EP 4: rank 3's one expert gets nothing
    "four_rank2_no_tokens": ((4, 3, 0, 5), range(E_FOUR)),
}
Cases = dict[str, tuple[tuple[int, ...], range]]


def test_uneven_placement_gives_the_first_ranks_one_expert_more() -> None:
    from engram_pretrain.parallel.groups import expert_bounds

    assert expert_counts(55, 8) == [7] * 7 + [6]  # 55 experts on 8 GPUs
    assert expert_bounds(55, 8) == [0, 7, 14, 21, 28, 35, 42, 49, 55]
    assert expert_bounds(7, 4) == [0, 2, 4, 6, 7] and expert_bounds(5, 2) == [0, 3, 5]
    assert expert_counts(8, 4) == [2] * 4 and expert_counts(3, 3) == [1] * 3
    with pytest.raises(ValueError, match="at least one expert"):
        expert_counts(3, 4)


def _case_inputs(cases: Cases, case: str, rank: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic tokens of `rank` in `case`: x [N, D], idx [N, K] distinct experts, w [N, K], g [N, D]."""
    tokens, allowed = cases[case]
    n = tokens[rank]
    gen = torch.Generator().manual_seed(100 * list(cases).index(case) + rank)
    allowed_t = torch.tensor(list(allowed))
    idx = torch.stack([allowed_t[torch.randperm(len(allowed_t), generator=gen)[:K]] for _ in range(n)]) \
        if n else torch.zeros(0, K, dtype=torch.long)
    x = torch.randn(n, D, generator=gen, dtype=torch.float64)
    w = torch.rand(n, K, generator=gen, dtype=torch.float64) + 0.1
    g = torch.randn(n, D, generator=gen, dtype=torch.float64)
    return x, idx, w, g


def _ref_swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """x: [D] -> [D] (math orientation x @ w)."""
    a = x @ w1
    return ((a / (1.0 + torch.exp(-a))) * (x @ w3)) @ w2


def _ref_out(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, weights: list[torch.Tensor]
             ) -> torch.Tensor:
    """Per-token loop: out[t] = sum_k w[t, k] * expert_{idx[t, k]}(x[t]) over the full expert set."""
    w1, w3, w2 = weights
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros(D, dtype=torch.float64)
        for j in range(K):
            e = int(idx[t, j])
            y = y + w[t, j] * _ref_swiglu(x[t], w1[e], w3[e], w2[e])
        rows.append(y)
    return torch.stack(rows) if rows else torch.zeros(0, D, dtype=torch.float64)


def _grad(t: torch.Tensor) -> np.ndarray:
    """The gradient of a reference leaf (zeros for a rank without tokens, where the loop built no graph)."""
    return np.zeros(tuple(t.shape)) if t.grad is None else t.grad.numpy()


def _dispatch_cases(rank: int, ep_size: int, num_experts: int, cases: Cases) -> dict[str, dict[str, Any]]:
    """Every case through an `AllToAllExpertDispatcher` over EP groups of `ep_size` and through the fp64
    per-token reference over the full expert set (the tokens of this rank's EP group; expert gradients
    summed over them)."""
    from engram_pretrain.parallel.expert_parallel import AllToAllExpertDispatcher
    from engram_pretrain.parallel.groups import new_expert_parallel_groups

    groups = new_expert_parallel_groups(ep_size)
    group_ranks = range(rank - groups.ep_rank, rank - groups.ep_rank + ep_size)
    dispatcher = AllToAllExpertDispatcher(groups.ep_group)
    count, offset = dispatcher.local_experts(num_experts)
    torch.manual_seed(0)
    full = GroupedExperts(D, H, num_experts, init_std=0.5).double()
    torch.manual_seed(0)
    shard = GroupedExperts(D, H, count, init_std=0.5, expert_offset=offset,
                           num_global_experts=num_experts).double()
    names = ("w1", "w3", "w2")
    results: dict[str, dict[str, Any]] = {}
    for case in cases:
        x, idx, w, g = _case_inputs(cases, case, rank)
        x.requires_grad_(True)
        w.requires_grad_(True)
        shard.zero_grad(set_to_none=True)
        out = dispatcher(x, idx, w, shard)
        (out * g).sum().backward()
        with torch.no_grad():
            local = LocalExpertDispatcher()(x, idx, w, full)
        ref_weights = [getattr(full, nm).detach().clone().requires_grad_(True) for nm in names]
        loss, ref_x, ref_w = torch.zeros((), dtype=torch.float64), None, None
        for r in group_ranks:
            xr, idr, wr, gr = _case_inputs(cases, case, r)
            xr.requires_grad_(True)
            wr.requires_grad_(True)
            loss = loss + (_ref_out(xr, idr, wr, ref_weights) * gr).sum()
            if r == rank:
                ref_x, ref_w, ref_out = xr, wr, _ref_out(xr, idr, wr, ref_weights)
        loss.backward()
        results[case] = {
            "tokens": cases[case][0][rank], "experts": (offset, count),
            "out": out.detach().numpy(), "ref_out": ref_out.detach().numpy(), "local_out": local.numpy(),
            "x_grad": x.grad.numpy(), "ref_x_grad": _grad(ref_x),
            "w_grad": w.grad.numpy(), "ref_w_grad": _grad(ref_w),
            "expert_grads": {nm: None if getattr(shard, nm).grad is None
                             else getattr(shard, nm).grad.numpy() for nm in names},
            "ref_expert_grads": {nm: rw.grad[offset:offset + count].numpy()
                                 for nm, rw in zip(names, ref_weights, strict=True)},
            "shard_is_slice": all(torch.equal(getattr(shard, nm), getattr(full, nm)[offset:offset + count])
                                  for nm in names),
        }
    return results


def _dispatcher_job(rank: int, world: int) -> dict[str, dict[str, Any]]:
    return {**_dispatch_cases(rank, 2, E, CASES), **_dispatch_cases(rank, 2, E_UNEVEN, UNEVEN_CASES)}


def _four_rank_dispatcher_job(rank: int, world: int) -> dict[int, dict[str, dict[str, Any]]]:
    return {ep: _dispatch_cases(rank, ep, E_FOUR, FOUR_RANK_CASES) for ep in (2, 4)}


@pytest.fixture(scope="module")
def dispatcher_runs() -> list[dict[str, dict[str, Any]]]:
    return run_distributed(_dispatcher_job, 2, timeout=120)


def _assert_dispatch_matches(r: dict[str, Any], what: str) -> None:
    tol = {"rtol": 1e-10, "atol": 1e-12}
    assert r["shard_is_slice"]
    n = r["tokens"]
    assert r["out"].shape == (n, D) and r["x_grad"].shape == (n, D) and r["w_grad"].shape == (n, K)
    np.testing.assert_allclose(r["out"], r["ref_out"], **tol)
    np.testing.assert_allclose(r["out"], r["local_out"], **tol)
    np.testing.assert_allclose(r["x_grad"], r["ref_x_grad"], **tol)
    np.testing.assert_allclose(r["w_grad"], r["ref_w_grad"], **tol)
    for name, ref in r["ref_expert_grads"].items():
        got = r["expert_grads"][name]
        assert got is not None, f"{name} has no gradient ({what})"  # zeros when idle, never None
        np.testing.assert_allclose(got, ref, err_msg=f"{what} {name}", **tol)


@pytest.mark.parametrize("case", [*CASES, *UNEVEN_CASES])
def test_all_to_all_dispatcher_matches_fp64_reference(dispatcher_runs: list[dict[str, Any]],
                                                       case: str) -> None:
    for rank, per_rank in enumerate(dispatcher_runs):
        _assert_dispatch_matches(per_rank[case], f"{case} rank {rank}")
    if case in UNEVEN_CASES:
        assert [r[case]["experts"] for r in dispatcher_runs] == [(0, 3), (3, 2)]


def test_idle_experts_get_zero_gradients(dispatcher_runs: list[dict[str, Any]]) -> None:
    for case in ("idle_rank1_experts", "uneven_idle_rank1_experts"):
        idle = dispatcher_runs[1][case]["expert_grads"]
        assert all(not np.any(g) for g in idle.values())
        busy = dispatcher_runs[0][case]["expert_grads"]
        assert all(np.any(g) for g in busy.values())


def test_uneven_dispatcher_on_four_ranks_matches_fp64_reference() -> None:
    """7 experts over EP groups of 4 (2, 2, 2, 1 experts) and of 2 (4, 3; two EP groups side by side)."""
    runs = run_distributed(_four_rank_dispatcher_job, 4, timeout=120)
    for rank, per_ep in enumerate(runs):
        for ep, per_case in per_ep.items():
            for case, r in per_case.items():
                _assert_dispatch_matches(r, f"EP {ep} {case} rank {rank}")
    assert [r[4]["four_random"]["experts"] for r in runs] == [(0, 2), (2, 2), (4, 2), (6, 1)]
    assert [r[2]["four_random"]["experts"] for r in runs] == [(0, 4), (4, 3), (0, 4), (4, 3)]
    assert not any(np.any(g) for g in runs[3][4]["four_last_expert_idle"]["expert_grads"].values())


# ----------------------------------------------------------------------------- training, EP=2 vs EP=1

@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset_dir(tmp_path_factory.mktemp("data") / "ds", vocab_size=96, num_docs=(200, 20))


def _gathered_grads(c: Any) -> dict[str, np.ndarray]:
    """Every backbone parameter's gradient; routed experts gathered over the EP group."""
    ep = c.expert_parallel
    out = {}
    for name, p in c.model.named_parameters():
        grad = p.grad.detach()
        if ep is not None and getattr(p, "allreduce", True) is False:
            parts = [torch.empty_like(grad) for _ in range(ep.ep_size)]
            dist.all_gather(parts, grad.contiguous(), group=ep.groups.ep_group)
            grad = torch.cat(parts)
        out[name] = grad.numpy().copy()
    return out


def _force_idle_experts(c: Any, experts: slice) -> None:
    """A huge negative routing bias: no token picks these experts in any MoE layer."""
    for moe in c.model.moe_layers():
        moe.router.expert_bias[experts] = -100.0


def _equivalence_job(rank: int, world: int, data: str, out: str) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for ep in (1, 2):
        common = (f"parallel.ep_size={ep}", "checkpoint.interval=0", "train.eval_interval=0")
        # gradients of one micro-batch after DeepSpeed's reduction (ZeRO-0: they stay whole in p.grad)
        t = _trainer(tiny_config(data, f"{out}/grad{ep}", *common, "deepspeed.zero_stage=0",
                                 "train.grad_accum_steps=1", "train.steps=2"))
        c = t.components
        batch = next(t.train_batches)
        ids = batch["input_ids"]
        c.engine.backward(c.engine(ids, labels=batch["labels"], engram_row_ids=c.row_ids(ids)).loss)
        res[f"grads{ep}"] = _gathered_grads(c)
        res[f"local_experts{ep}"] = [tuple(m.experts.w1.shape) for m in c.model.moe_layers()]
        res[f"has_moe{ep}"] = bool(c.engine.has_moe_layers)
        _close(t)
        # 4 optimizer steps under ZeRO-2 with an active gradient clip (the global norm spans all experts)
        t = _trainer(tiny_config(data, f"{out}/z2_{ep}", *common, "deepspeed.zero_stage=2", "train.steps=4",
                                 "optimizer.grad_clip=0.05"))
        stats = [t.train_step() for _ in range(4)]
        res[f"run{ep}"] = {"losses": [s.loss for s in stats], "norms": [s.grad_norm for s in stats],
                           "loads": [[ld.tolist() for ld in s.loads] for s in stats], "state": _state(t),
                           "groups": [g.get("name")
                                      for g in t.components.engine.optimizer.optimizer.param_groups]}
        _close(t)
        # one step where EP rank 1's experts (2, 3) receive no token anywhere: nothing hangs, same result
        t = _trainer(tiny_config(data, f"{out}/idle{ep}", *common, "deepspeed.zero_stage=2", "train.steps=2"))
        _force_idle_experts(t.components, slice(2, 4))
        before = _state(t)
        stats = t.train_step()
        res[f"idle{ep}"] = {"loss": stats.loss, "loads": [ld.tolist() for ld in stats.loads],
                            "before": before, "after": _state(t)}
        _close(t)
    res["resume"] = _resume_job(rank, world, data, f"{out}/resume", [2])  # one spawn: DeepSpeed imports once
    return res


@pytest.fixture(scope="module")
def ep_runs(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ep")
    return run_distributed(_equivalence_job, 2, args=(str(dataset), str(out)), timeout=600)


def _assert_states_close(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    assert got.keys() == ref.keys()
    for name, tensor in ref.items():
        # Adam turns reduction-order noise in near-zero gradients into a fraction of one LR step (3e-3)
        np.testing.assert_allclose(got[name], tensor, rtol=1e-3, atol=2e-4, err_msg=name)


def test_ep2_gradients_equal_ep1_after_deepspeed_reduction(ep_runs: list[dict[str, Any]]) -> None:
    for r in ep_runs:
        assert not r["has_moe1"] and r["has_moe2"]
        assert r["local_experts1"] == [(E, 32, 16)] * 2 and r["local_experts2"] == [(E // 2, 32, 16)] * 2
        g1, g2 = r["grads1"], r["grads2"]
        assert g1.keys() == g2.keys()
        for name, ref in g1.items():
            if ".ffn." in name:  # (some Engram weights start with a zero gradient by design)
                assert np.any(ref), name
            np.testing.assert_allclose(g2[name], ref, rtol=1e-5, atol=1e-7, err_msg=name)


def test_ep2_training_matches_ep1(ep_runs: list[dict[str, Any]]) -> None:
    for r in ep_runs:
        one, two = r["run1"], r["run2"]
        assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
        assert one["losses"][-1] < one["losses"][0]
        # before the first update the norms differ only by reduction order; after Adam steps, by what Adam
        # makes of that noise in near-zero gradients (seen: 8e-4 relative at step 4 with today's releases)
        assert two["norms"][0] == pytest.approx(one["norms"][0], rel=1e-5)
        assert two["norms"] == pytest.approx(one["norms"], rel=2e-3)
        assert min(one["norms"]) > 0.05  # the clip was active: the norm must have spanned all experts
        # loss-free bias loads: global-batch counts at the router, identical for both layouts
        assert two["loads"] == one["loads"]
        assert all(sum(layer) == 2 * 2 * 2 * 32 * 2 for step in one["loads"] for layer in step)
        assert "ep_size_2" in two["groups"] and "ep_size_2" not in one["groups"]
        _assert_states_close(two["state"], one["state"])
    _assert_states_close(ep_runs[1]["run2"]["state"], ep_runs[0]["run2"]["state"])


def test_ep2_with_idle_experts_matches_ep1(ep_runs: list[dict[str, Any]]) -> None:
    for r in ep_runs:
        one, two = r["idle1"], r["idle2"]
        assert all(layer[2] == layer[3] == 0 for layer in two["loads"])
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
        _assert_states_close(two["after"], one["after"])
        for name in two["after"]:
            if ".experts." in name:  # idle experts only decay (no gradient); busy ones moved
                idle_before, idle_after = two["before"][name][2:], two["after"][name][2:]
                busy_before, busy_after = two["before"][name][:2], two["after"][name][:2]
                decay = idle_after.flat[0] / idle_before.flat[0]
                np.testing.assert_allclose(idle_after, idle_before * decay, rtol=1e-6)
                assert 0.99 < decay < 1.0
                assert np.abs(busy_after - busy_before).max() > 1e-4


# ----------------------------------------------------------------------------- checkpoints

def _resume_job(rank: int, world: int, data: str, out: str, stages: list[int]) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for stage in stages:
        res[stage] = _straight_vs_resumed(data, f"{out}/z{stage}",
                                          (f"deepspeed.zero_stage={stage}", "parallel.ep_size=2"))
    ckpt = Path(out) / f"z{stages[0]}" / "interrupted" / "checkpoints" / "step_3"
    res["files"] = sorted(p.name for p in (ckpt / EXPERTS_DIR).iterdir())
    cfg = tiny_config(data, f"{out}/z{stages[0]}/interrupted", f"deepspeed.zero_stage={stages[0]}",
                      "parallel.ep_size=1", "train.steps=6")
    try:
        _close(_trainer(cfg, str(ckpt)))
        res["ep1_resume"] = None
    except ValueError as err:
        res["ep1_resume"] = str(err)
    return res


def _check_resume(per_rank: list[dict[str, Any]], stages: list[int]) -> None:
    for r in per_rank:
        for stage in stages:
            assert r[stage]["straight"][-1] < r[stage]["straight"][0]
            _assert_exact_resume(r[stage])
        assert r["files"] == ["ep_rank_00000.pt", "ep_rank_00001.pt", "meta.json"]
        assert r["ep1_resume"] is not None and "parallel.ep_size=2" in r["ep1_resume"]


def test_resume_with_ep2_is_bitwise_under_zero2(ep_runs: list[dict[str, Any]]) -> None:
    _check_resume([r["resume"] for r in ep_runs], [2])


@pytest.mark.slow
def test_resume_with_ep2_is_bitwise_under_zero1_and_zero0(dataset: Path, tmp_path: Path) -> None:
    per_rank = run_distributed(_resume_job, 2, args=(str(dataset), str(tmp_path), [1, 0]), timeout=600)
    _check_resume(per_rank, [1, 0])


# ----------------------------------------------------------------------------- uneven experts: 5 on EP 2

UNEVEN = ("model.moe.num_routed_experts=5", "checkpoint.interval=0", "train.eval_interval=0",
          "train.deterministic=true", "train.steps=4")
CLIP = "optimizer.grad_clip=0.05"
UNEVEN_RUNS = {  # name: (ep_size, ZeRO stage, clip); ZeRO 0 clips by DeepSpeed's mean of per-rank norms
    "ep1_z2": (1, 2, CLIP), "ep2_z2": (2, 2, CLIP), "ep1_z1": (1, 1, CLIP), "ep2_z1": (2, 1, CLIP),
    "ep1_z0": (1, 0, "optimizer.grad_clip=0"), "ep2_z0": (2, 0, "optimizer.grad_clip=0"),
}


def _uneven_job(rank: int, world: int, data: str, out: str) -> dict[str, Any]:
    """5 experts (EP 2: 3 + 2): 3 steps per layout; checkpoints of EP 1 and EP 2 under ZeRO 2, resumed at
    EP 2, loaded with `checkpoint.init_from` at the other EP size, exported."""
    from engram_pretrain.export.commands import export_checkpoint
    from engram_pretrain.export.importer import read_state_dict
    from engram_pretrain.train.checkpoint import checkpoint_state_dict

    def trainer(name: str, ep: int, stage: int, *extra: str, resume: str | None = None) -> Any:
        return _trainer(tiny_config(data, f"{out}/{name}", *UNEVEN, f"parallel.ep_size={ep}",
                                    f"deepspeed.zero_stage={stage}", *extra), resume)

    res: dict[str, Any] = {}
    for name, (ep, stage, clip) in UNEVEN_RUNS.items():
        t = trainer(name, ep, stage, clip)
        stats = [t.train_step() for _ in range(3)]
        r = {"losses": [s.loss for s in stats], "norms": [s.grad_norm for s in stats], "state": _state(t),
             "local_experts": [m.experts.num_experts for m in t.components.model.moe_layers()]}
        if stage == 2:  # checkpoint at step 3, then one more step for the resume to reproduce
            r["ckpt"] = str(t.save().path)
            r["loss4"], r["state4"] = t.train_step().loss, _state(t)
        _close(t)
        res[name] = r
    # resume the uneven EP 2 checkpoint at EP 2: DeepSpeed's module file holds EP rank 0's 3 experts
    t = trainer("ep2_z2", 2, 2, CLIP, resume="auto")
    res["resume"] = {"step": t.step, "loss4": t.train_step().loss, "state4": _state(t)}
    _close(t)
    ckpt1, ckpt2 = res["ep1_z2"]["ckpt"], res["ep2_z2"]["ckpt"]
    if rank == 0:  # exports consolidate the uneven shards (and serve as an init_from source below)
        export_checkpoint(ckpt1, f"{out}/hf_ep1")
        export_checkpoint(ckpt2, f"{out}/hf_ep2")
        res["export_ep2"] = {k: v.numpy() for k, v in read_state_dict(f"{out}/hf_ep2").items()}
    dist.barrier()
    for name, source, ep, stage in (("ep2_ckpt_into_ep1", ckpt2, 1, 2), ("ep1_ckpt_into_ep2", ckpt1, 2, 1),
                                    ("ep2_export_into_ep2", f"{out}/hf_ep2", 2, 2)):
        t = trainer(name, ep, stage, CLIP, f"checkpoint.init_from={source}")
        res[name] = {"state0": _state(t), "loss": t.train_step().loss}
        _close(t)
    res["ckpt_state"] = {c: {k: v.numpy() for k, v in checkpoint_state_dict(c).items()}
                         for c in (ckpt1, ckpt2)}
    return res


@pytest.fixture(scope="module")
def uneven_runs(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("uneven")
    return run_distributed(_uneven_job, 2, args=(str(dataset), str(out)), timeout=600)


def test_uneven_experts_train_like_ep1_under_zero_0_1_2(uneven_runs: list[dict[str, Any]]) -> None:
    for rank, r in enumerate(uneven_runs):
        assert r["ep1_z2"]["local_experts"] == [5, 5] and r["ep2_z2"]["local_experts"] == [(3, 2)[rank]] * 2
        for name in ("ep2_z2", "ep2_z1"):  # the clip is active: the norm spans 3 + 2 experts
            ref = r[name.replace("ep2", "ep1")]
            assert r[name]["losses"] == pytest.approx(ref["losses"], rel=1e-5), name
            assert r[name]["norms"][0] == pytest.approx(ref["norms"][0], rel=1e-5), name
            assert r[name]["norms"] == pytest.approx(ref["norms"], rel=2e-3), name
            _assert_states_close(r[name]["state"], ref["state"])
        assert min(r["ep1_z2"]["norms"]) > 0.05 and r["ep1_z2"]["losses"][-1] < r["ep1_z2"]["losses"][0]
        assert r["ep2_z0"]["losses"] == pytest.approx(r["ep1_z0"]["losses"], rel=1e-5)
        _assert_states_close(r["ep2_z0"]["state"], r["ep1_z0"]["state"])
    for name in UNEVEN_RUNS:  # both EP ranks gathered the same whole model
        for key, value in uneven_runs[0][name]["state"].items():
            assert np.array_equal(value, uneven_runs[1][name]["state"][key]), (name, key)


def test_uneven_checkpoint_resumes_bitwise_and_consolidates(uneven_runs: list[dict[str, Any]]) -> None:
    for r in uneven_runs:
        straight, resumed = r["ep2_z2"], r["resume"]
        assert resumed["step"] == 3 and resumed["loss4"] == straight["loss4"]
        assert resumed["state4"].keys() == straight["state4"].keys()
        for name, value in straight["state4"].items():
            assert np.array_equal(resumed["state4"][name], value), name
        # the checkpoint's consolidated state (the export's source) is the live model at step 3, bitwise
        saved = r["ckpt_state"][straight["ckpt"]]
        assert saved.keys() == straight["state"].keys()
        for name, value in straight["state"].items():
            assert np.array_equal(saved[name], value), name
    exported = uneven_runs[0]["export_ep2"]
    experts = [n for n in uneven_runs[0]["ep2_z2"]["state"] if ".experts." in n]
    assert experts and all(exported[n].shape[0] == 5 for n in experts)
    for name in experts:
        assert np.array_equal(exported[name], uneven_runs[0]["ep2_z2"]["state"][name]), name


def test_uneven_checkpoint_loads_at_another_ep_size(uneven_runs: list[dict[str, Any]]) -> None:
    """checkpoint.init_from: EP 2 (3 + 2 experts) -> EP 1, EP 1 -> EP 2, and the export of the EP 2
    checkpoint cut to EP 2 ranks: the loaded model equals the source bitwise."""
    for r in uneven_runs:
        sources = {"ep2_ckpt_into_ep1": r["ep2_z2"]["ckpt"], "ep1_ckpt_into_ep2": r["ep1_z2"]["ckpt"],
                   "ep2_export_into_ep2": r["ep2_z2"]["ckpt"]}
        for name, ckpt in sources.items():
            want, got = r["ckpt_state"][ckpt], r[name]["state0"]
            assert got.keys() == want.keys(), name
            for key, value in want.items():
                assert np.array_equal(got[key], value), (name, key)
        # same weights, fresh optimizer, same data: the same first loss at EP 1 and EP 2
        assert r["ep2_export_into_ep2"]["loss"] == pytest.approx(r["ep2_ckpt_into_ep1"]["loss"], rel=1e-5)


# ----------------------------------------------------------------------------- 4 ranks: DP 2 x EP 2

def _four_rank_job(rank: int, world: int, data: str, out: str, num_experts: int, steps: int
                   ) -> dict[str, Any]:
    res = {}
    for ep in (1, 2, 4):
        cfg = tiny_config(data, f"{out}/ep{ep}", f"parallel.ep_size={ep}", "deepspeed.zero_stage=2",
                          f"train.steps={steps}", "train.micro_batch_size=1", "optimizer.grad_clip=0.05",
                          "checkpoint.interval=0", "train.eval_interval=0",
                          f"model.moe.num_routed_experts={num_experts}")
        t = _trainer(cfg)
        stats = [t.train_step() for _ in range(steps)]
        experts = t.components.model.moe_layers()[0].experts
        res[ep] = {"losses": [s.loss for s in stats], "norms": [s.grad_norm for s in stats],
                   "state": _state(t), "local_experts": experts.num_experts}
        _close(t)
    return res


@pytest.mark.parametrize("num_experts, steps", [pytest.param(E, 3, marks=pytest.mark.slow), (E_FOUR, 2)],
                         ids=["4-experts", "7-experts-uneven"])
def test_four_ranks_ep2_and_ep4_match_ep1(dataset: Path, tmp_path: Path, num_experts: int, steps: int
                                          ) -> None:
    """EP 2 x DP 2: expert gradients reduced over the expert-data-parallel pairs [0, 2] and [1, 3]. With 7
    experts (uneven, not slow: 2 steps) EP 2 holds 4 + 3 experts per rank and EP 4 2 + 2 + 2 + 1."""
    runs = run_distributed(_four_rank_job, 4, args=(str(dataset), str(tmp_path), num_experts, steps),
                           timeout=900)
    counts = {2: expert_counts(num_experts, 2) * 2, 4: expert_counts(num_experts, 4)}
    for rank, r in enumerate(runs):
        for ep in (2, 4):
            assert r[ep]["local_experts"] == counts[ep][rank]
            assert r[ep]["losses"] == pytest.approx(r[1]["losses"], rel=1e-5)
            assert r[ep]["norms"] == pytest.approx(r[1]["norms"], rel=1e-4)
            _assert_states_close(r[ep]["state"], r[1]["state"])
