"""Training tokens/s of our tiny model vs a Hugging Face `transformers` DeepseekV3 model of the same
dimensions under the same DeepSpeed config (issue 4, benchmark 2; goal: ours >= 1.5x).

Rows (same processes, same DeepSpeed JSON with the same run settings from `build_ds_config`, same micro batch,
sequence length, data, AdamW hyper-parameters and decay / no-decay groups, fp32 on CPU):

- `ours (MLA, M=1, no Engram)`: `configs/tiny.yaml` with `attention.kind=mla` at the HF model's MLA dims,
  `hyper_connections.num_streams=1` and no Engram: the apples-to-apples row. Its parameters match the HF
  model's one for one (same count; both models are built from the same numbers).
- `ours (tiny.yaml: GQA, mHC M=4, Engram)`: the full tiny model, for reference (different attention and more
  work per token: four residual streams, Engram).
- `HF DeepseekV3 (<experts implementation>)`: `DeepseekV3ForCausalLM` from `DeepseekV3Config` mapped from
  our MLA config (hidden, layers, heads, q/kv LoRA ranks, nope/rope/v head dims, routed/shared experts,
  top-k, expert and dense FFN widths, first_k_dense_replace, sigmoid routing with one group, routed scaling,
  vocab, RMSNorm eps, init std; `rope_interleave=False` like ours; SDPA attention). The experts
  implementation is transformers' default (`grouped_mm`; it falls back to `eager` where unavailable) and,
  with `--hf-experts`, others (`eager`: a loop over the hit experts; `batched_mm`).

Ours is stepped by the real trainer (`Trainer.train_step`: data, forward/backward/step, the per-step
all-reduce of loss and expert loads, the MoE bias update and, for the Engram row, hashing and the row-sparse
table update). HF is stepped by the same minimal loop the trainer runs for one micro-batch: next batch, LR
set, `engine(input_ids)`, fp32 cross-entropy over the logits with the same (already shifted) labels,
`engine.backward`, `engine.step`, one all-reduce of the loss. The rows are interleaved round by round
(`benchmarks/engram_overhead.py`), warm-up steps excluded; wall time (rank 0) and process CPU time (mean over
the ranks; the steadier measure on a shared machine), medians and IQRs; speeds both as the ratio of the
medians and as the median of the per-round (paired) ratios. tokens/s (CPU) = global tokens per
step / CPU seconds per rank: about the throughput with one dedicated core per rank.

`--profile`: one process, torch.profiler over a few steps of our MLA row and the first HF row; prints the top
operators by self CPU time (the timing table is skipped).

Usage (repo root): python -m benchmarks.vs_hf_deepseek [--nproc 2] [--rounds 30] [--steps-per-round 1]
    [--warmup 3] [--zero-stage 2] [--hf-experts default,eager] [--profile] [--json out.json] [override ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    CONFIG,
    interleaved_times,
    load_average,
    merge_ranks,
    print_table,
    quiet,
    round_ratios,
    run_config,
    run_jobs,
    spread,
    summarize,
    synthetic_dataset,
)

MLA = ["model.attention.kind=mla", "model.attention.head_dim=16", "model.attention.rope_head_dim=8",
       "model.attention.kv_lora_rank=32", "model.attention.q_lora_rank=null",
       "model.attention.v_head_dim=16"]
"""MLA dims of the comparison at tiny's width (64 = 4 heads x 16): nope 16 + rope 8 per head, KV latent 32,
direct query projection."""
APPLES = [*MLA, "model.hyper_connections.num_streams=1", "model.engram.layers=[]"]
"""Our row comparable with HF DeepseekV3: MLA, plain residual (M=1), no Engram."""


def hf_config(model_cfg: Any, experts_implementation: str | None) -> Any:
    """`DeepseekV3Config` with the dimensions of our MLA model config (`ModelConfig`)."""
    from transformers import DeepseekV3Config

    a, m = model_cfg.attention, model_cfg.moe
    if a.kind != "mla":
        raise ValueError("hf_config maps MLA configs only (DeepseekV3 has MLA): set attention.kind=mla")
    if model_cfg.hyper_connections.num_streams != 1 or model_cfg.engram.layers:
        raise ValueError("hf_config: DeepseekV3 has no mHC or Engram: needs num_streams=1, engram.layers=[]")
    if m.score_func != "sigmoid":
        raise ValueError("hf_config: DeepseekV3 routes with sigmoid scores")
    nope = a.head_dim or model_cfg.hidden_size // a.num_heads
    kwargs: dict[str, Any] = {}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    return DeepseekV3Config(
        vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.hidden_size,
        num_hidden_layers=model_cfg.num_layers, num_attention_heads=a.num_heads,
        num_key_value_heads=a.num_heads,
        q_lora_rank=a.q_lora_rank, kv_lora_rank=a.kv_lora_rank, qk_nope_head_dim=nope,
        qk_rope_head_dim=a.rope_head_dim, v_head_dim=a.v_head_dim or nope,
        intermediate_size=model_cfg.dense_ffn_dim, moe_intermediate_size=m.expert_dim,
        n_routed_experts=m.num_routed_experts, num_experts_per_tok=m.top_k,
        n_shared_experts=m.num_shared_experts, first_k_dense_replace=m.first_k_dense, n_group=1, topk_group=1,
        norm_topk_prob=m.norm_topk_prob, routed_scaling_factor=m.routed_scaling_factor,
        max_position_embeddings=model_cfg.max_seq_len, rms_norm_eps=model_cfg.norm_eps,
        initializer_range=model_cfg.init_std, tie_word_embeddings=model_cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta}, rope_interleave=False,
        attention_dropout=0.0, use_cache=False, attn_implementation="sdpa", **kwargs)


class HFStep:
    """One training step of an HF causal LM on a DeepSpeed engine, mirroring `Trainer._optimizer_step`."""

    def __init__(self, cfg: Any, rank: int, world: int, experts_implementation: str | None) -> None:
        import deepspeed
        from transformers import DeepseekV3ForCausalLM

        from engram_pretrain.data.loader import build_loaders
        from engram_pretrain.train.distributed import quiet_deepspeed, seed_everything
        from engram_pretrain.train.ds_config import build_ds_config
        from engram_pretrain.train.optimizers import GuardedAdamW

        quiet_deepspeed()
        self.cfg = cfg
        seed_everything(cfg.train.seed)
        model = DeepseekV3ForCausalLM(hf_config(cfg.model, experts_implementation))
        self.experts_implementation = model.config._experts_implementation
        self.num_params = sum(p.numel() for p in model.parameters())
        o = cfg.optimizer
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": o.weight_decay, "lr": o.lr, "base_lr": o.lr},
                  {"params": no_decay, "weight_decay": 0.0, "lr": o.lr, "base_lr": o.lr}]
        optimizer = GuardedAdamW(groups, lr=o.lr, betas=(o.betas[0], o.betas[1]), eps=o.eps,
                                 weight_decay=o.weight_decay)
        self.ds_config = build_ds_config(cfg, world, use_cuda=False)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config,
                                                    dist_init_required=False)
        self.batches, _, _ = build_loaders(cfg, rank, world)

    def __call__(self) -> float:
        import torch
        import torch.distributed as dist
        import torch.nn.functional as F

        engine = self.engine
        for g in engine.optimizer.param_groups:
            g["lr"] = g["base_lr"]
        loss_sum = torch.zeros((), dtype=torch.float64)
        for _ in range(self.cfg.train.grad_accum_steps):
            batch = next(self.batches)
            logits = engine(input_ids=batch["input_ids"], use_cache=False).logits  # [B, T, V]
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
            loss_sum += loss.detach().double()
            engine.backward(loss)
            engine.step()
        dist.all_reduce(loss_sum)
        return float(loss_sum)

    def close(self) -> None:
        destroy = getattr(self.engine, "destroy", None)
        if destroy is not None:
            destroy()


def _build(rank: int, world: int, data: str, out: str, variants: dict[str, dict[str, Any]]
           ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Step callables, closers and facts (parameter counts, experts implementation) of every variant."""
    from engram_pretrain.analysis.params import count_parameters
    from engram_pretrain.train.loop import build_trainer

    steps, closers, facts = {}, {}, {}
    for name, v in variants.items():
        cfg = run_config(Path(data), Path(out) / name, *v["overrides"])
        if v["kind"] == "ours":
            trainer = build_trainer(cfg, resume="none")
            steps[name] = trainer.train_step
            closers[name] = getattr(trainer.components.engine, "destroy", lambda: None)
            counts = count_parameters(cfg.model)
            facts[name] = {"params": counts.total, "activated": counts.activated_with_head}
        else:
            hf = HFStep(cfg, rank, world, v["experts"])
            steps[name] = hf
            closers[name] = hf.close
            facts[name] = {"params": hf.num_params, "experts_implementation": hf.experts_implementation}
    return steps, closers, facts


def _job(rank: int, world: int, data: str, out: str, variants: dict[str, dict[str, Any]], warmup: int,
         rounds: int, per_round: int) -> dict[str, Any]:
    quiet()
    steps, closers, facts = _build(rank, world, data, out, variants)
    times = interleaved_times(steps, warmup, rounds, per_round)
    for close in closers.values():
        close()
    return {"times": times, "facts": facts}


def _profile_job(rank: int, world: int, data: str, out: str, variants: dict[str, dict[str, Any]], warmup: int,
                 steps_to_profile: int, top: int) -> dict[str, str]:
    quiet()
    from torch.profiler import ProfilerActivity, profile

    del rank, world
    steps, closers, _ = _build(rank=0, world=1, data=data, out=out, variants=variants)
    tables = {}
    for name, fn in steps.items():
        for _ in range(warmup):
            fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps_to_profile):
                fn()
        tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top,
                                                 max_name_column_width=60)
        del prof
    for close in closers.values():
        close()
    return tables


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2, help="gloo processes (1 thread each), same for all rows")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps-per-round", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--hf-experts", default="default,eager",
                    help="comma list of HF experts implementations (default = transformers' choice)")
    ap.add_argument("--no-full", action="store_true", help="skip the full tiny.yaml row")
    ap.add_argument("--profile", action="store_true", help="profile (1 process) instead of timing")
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=25, help="operators listed per profile")
    ap.add_argument("--json", type=Path, help="write the raw times and summaries here")
    ap.add_argument("overrides", nargs="*", help="config overrides for every row (key=value)")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    quiet()
    common = [*args.overrides, f"deepspeed.zero_stage={args.zero_stage}"]
    variants: dict[str, dict[str, Any]] = {"ours": {"kind": "ours", "overrides": [*common, *APPLES]}}
    if not args.no_full and not args.profile:
        variants["ours-full"] = {"kind": "ours", "overrides": common}
    for impl in args.hf_experts.split(","):
        variants[f"hf-{impl}"] = {"kind": "hf", "overrides": [*common, *APPLES],
                                  "experts": None if impl == "default" else impl}
    with tempfile.TemporaryDirectory(prefix="bench_hf_") as tmp:
        root = Path(tmp)
        data = synthetic_dataset(root, run_config(root, root, *common).model.vocab_size)
        cfg = run_config(data, root, *common, *APPLES)
        if args.profile:
            first_hf = next(n for n in variants if n.startswith("hf-"))
            tables = run_jobs(_profile_job, 1, (str(data), str(root / "runs"),
                                                {n: variants[n] for n in ("ours", first_hf)}, args.warmup,
                                                args.profile_steps, args.top))[0]
            for name, table in tables.items():
                print(f"\n== {name}: {args.profile_steps} steps, top operators by self CPU time ==\n{table}")
            return
        load_before = load_average()
        res = run_jobs(_job, args.nproc, (str(data), str(root / "runs"), variants, args.warmup, args.rounds,
                                          args.steps_per_round))
        load_after = load_average()
    tokens = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.data.seq_len * args.nproc
    times = merge_ranks([r["times"] for r in res])
    facts = res[0]["facts"]
    wall = {n: summarize(t) for n, t in times["wall"].items()}
    cpu = {n: summarize(t) for n, t in times["cpu"].items()}
    hf_names = [n for n in variants if n.startswith("hf-")]
    ref = hf_names[0]
    print(f"\nours vs HF DeepseekV3: {CONFIG} dims, {args.nproc} gloo process(es) x 1 thread, "
          f"ZeRO-{args.zero_stage}, fp32, AdamW, {tokens} tokens/step (micro batch "
          f"{cfg.train.micro_batch_size} x seq {cfg.data.seq_len} x {args.nproc} ranks), {args.warmup} "
          f"warm-up + {args.rounds} rounds x {args.steps_per_round} timed steps per row")
    print(f"before: {load_before}; after: {load_after}\n")
    labels = {"ours": "ours (MLA, M=1, no Engram)", "ours-full": "ours (tiny.yaml: GQA, mHC M=4, Engram)"}
    for n in hf_names:
        labels[n] = f"HF DeepseekV3 (experts: {facts[n]['experts_implementation']})"
    rows = []
    paired = {k: {n: [1.0 / r for r in round_ratios(times[k][n], times[k][ref])] for n in wall}
              for k in ("wall", "cpu")}
    for name in wall:
        w, c = wall[name], cpu[name]
        rows.append([labels[name], f"{facts[name]['params']:,}",
                     f"{w.median * 1e3:.0f} ({w.p25 * 1e3:.0f}-{w.p75 * 1e3:.0f})",
                     f"{c.median * 1e3:.0f} ({c.p25 * 1e3:.0f}-{c.p75 * 1e3:.0f})",
                     f"{tokens / w.median:,.0f}", f"{tokens / c.median:,.0f}",
                     f"{wall[ref].median / w.median:.2f}", spread(paired["wall"][name]),
                     f"{cpu[ref].median / c.median:.2f}", spread(paired["cpu"][name])])
    print_table(["row", "params", "wall ms: median (IQR)", "CPU ms: median (IQR)", "tokens/s (wall)",
                 "tokens/s (CPU)", "speed vs HF (wall)", "paired: median (IQR)", "speed vs HF (CPU)",
                 "paired: median (IQR)"], rows)
    print(f"\nreference: {labels[ref]}")
    for kind, summ in (("wall", wall), ("cpu", cpu)):
        speedup = summ[ref].median / summ["ours"].median
        pair = statistics.median(paired[kind]["ours"])
        print(f"ours (MLA, M=1, no Engram) / HF tokens/s, {kind}: ratio of medians {speedup:.2f}x, paired "
              f"median {pair:.2f}x  goal >= 1.5x: {'met' if min(speedup, pair) >= 1.5 else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps({
            "args": vars(args) | {"json": str(args.json)}, "load_before": load_before,
            "load_after": load_after, "tokens_per_step": tokens, "variants": variants, "facts": facts,
            "times": times, "summaries": {"wall": {n: vars(v) for n, v in wall.items()},
                                          "cpu": {n: vars(v) for n, v in cpu.items()}}}, indent=1))


if __name__ == "__main__":
    main()
