"""`engram-pretrain plan <config> --nodes N --gpus-per-node G --gpu h100|h200|a100 [overrides]`: per-GPU
memory, communication, FLOPs and step time of the run's layout, and the best layout that fits when it does
not (docs/parallelism.md, "Planning a layout"). `--json` prints the same as one JSON object."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .hardware import GB, Cluster, gpu_spec
from .planner import Assumptions, LayoutPlan, PlanReport, plan_run


def plan_dict(p: LayoutPlan) -> dict[str, Any]:
    """Machine-readable form of one layout's plan (bytes, seconds, FLOPs)."""
    return {"layout": vars(p.layout), "fits": p.fits, "problem": p.problem,
            "device_bytes": p.device_bytes, "usable_bytes": p.usable * p.hbm,
            "state": p.state.as_dict(),
            "activations": {"saved": p.activations.saved, "recompute_peak": p.activations.recompute_peak},
            "logits_buffers": p.logits, "deepspeed_buffers": p.buffers,
            "comm_bytes": p.comm.items, "comm_bytes_total": p.comm.total,
            "flops": {"model": p.flops.model, "hardware": p.flops.hardware},
            "compute_s": p.compute_s, "comm_s": p.comm_s, "offload_s": p.offload_s, "step_s": p.step_s,
            "mfu": p.mfu, "mfu_with_comm": p.mfu_with_comm, "notes": p.notes}


def report_dict(r: PlanReport) -> dict[str, Any]:
    return {"config": r.cfg.name, "nodes": r.cluster.nodes, "gpus_per_node": r.cluster.gpus_per_node,
            "gpu": r.cluster.gpu.name, "assumptions": vars(r.assumptions),
            "requested": plan_dict(r.requested),
            "proposal": plan_dict(r.proposal) if r.proposal is not None else None,
            "changes": r.changes, "layouts_considered": r.considered}


def _gb(n: float) -> str:
    return f"{n / GB:.2f}"


def _rows(p: LayoutPlan) -> list[tuple[str, str]]:
    lay, s, a = p.layout, p.state, p.activations
    offload = " +offload" if lay.offload_optimizer else ""
    fits = "yes" if p.fits else "NO" + (f": {p.problem}" if p.problem else "")
    rows = [("layout", f"ZeRO-{lay.zero_stage}{offload}, ep {lay.ep_size}, "
                       f"tables {lay.table_sharding}{' (host)' if lay.host_tables else ''}, "
                       f"recompute {lay.activation_checkpointing}, micro-batch {lay.micro_batch_size} x "
                       f"{lay.grad_accum_steps}"),
            ("parameters GB", _gb(s.params)), ("gradients GB", _gb(s.grads)),
            ("fp32 master GB", _gb(s.master)), ("optimizer states GB", _gb(s.optim)),
            ("engram table shard GB", _gb(s.tables)), ("table Adam state GB", _gb(s.table_optim)),
            ("activations GB", _gb(a.saved)), ("recompute peak GB", _gb(a.recompute_peak)),
            ("logits buffers GB", _gb(p.logits)),
            ("DeepSpeed buckets GB", _gb(sum(p.buffers.values()))),
            ("device total GB", f"{_gb(p.device_bytes)} of {_gb(p.usable * p.hbm)} usable"),
            ("host GB", _gb(s.host)), ("fits", fits)]
    for name, nbytes in p.comm.items.items():
        rows.append((f"comm {name} GB/step", _gb(nbytes)))
    rows += [("model TFLOP/step/GPU", f"{p.flops.model / 1e12:.1f}"),
             ("hardware TFLOP/step/GPU", f"{p.flops.hardware / 1e12:.1f}"),
             ("step s (compute / comm / offload)", f"{p.compute_s:.2f} / {p.comm_s:.2f} / {p.offload_s:.2f}"),
             ("MFU (compute only / with comm)", f"{100 * p.mfu:.1f}% / {100 * p.mfu_with_comm:.1f}%")]
    rows += [("note", n) for n in p.notes]
    return rows


def render(r: PlanReport) -> str:
    """The readable table: the run's layout and, if it does not fit, the proposal next to it."""
    c, a = r.cluster, r.assumptions
    head = (f"{r.cfg.name} on {c.nodes} x {c.gpus_per_node} {c.gpu.name} ({c.world} GPUs, "
            f"{c.gpu.hbm_bytes / GB:.0f} GB, {c.gpu.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16); "
            f"efficiency {a.efficiency:.0%}, table dedup {a.dedup:.0%}, usable HBM {a.usable:.0%}; "
            f"per GPU, largest rank")
    cols = [("requested", _rows(r.requested))]
    if r.proposal is not None:
        cols.append(("proposal", _rows(r.proposal)))
    labels: list[str] = []
    for _, rows in cols:
        labels += [k for k, _ in rows if k not in labels]
    values = [dict(rows) for _, rows in cols]
    width = max(len(k) for k in labels)
    names = [name for name, _ in cols]
    colw = [max(len(n), *(len(v.get(k, "")) for k in labels)) for n, v in zip(names, values, strict=True)]
    lines = [head, "", "  ".join([" " * width] + [n.ljust(w) for n, w in zip(names, colw, strict=True)])]
    for k in labels:
        cells = [v.get(k, "").ljust(w) for v, w in zip(values, colw, strict=True)]
        lines.append("  ".join([k.ljust(width), *cells]))
    if not r.requested.fits:
        lines.append("")
        if r.proposal is None:
            lines.append(f"nothing fits among {r.considered} layouts: more nodes, or a larger GPU")
        else:
            lines.append("smallest change that fits: " + (" ".join(r.changes) or "(none)"))
    return "\n".join(line.rstrip() for line in lines)


def cmd_plan(args: argparse.Namespace) -> int:
    from ..config import load_preset

    cfg = load_preset(args.config, args.overrides)
    for key in ("nodes", "gpus_per_node"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')}: must be >= 1")
    cluster = Cluster(args.nodes, args.gpus_per_node, gpu_spec(args.gpu))
    if not 0 < args.efficiency <= 1:
        raise ValueError("--efficiency: must be in (0, 1]")
    if not 0 <= args.dedup < 1:
        raise ValueError("--dedup: must be in [0, 1)")
    if not 0 < args.usable <= 1:
        raise ValueError("--usable: must be in (0, 1]")
    report = plan_run(cfg, cluster, Assumptions(args.efficiency, args.dedup, args.usable))
    print(json.dumps(report_dict(report), indent=2) if args.json else render(report))
    return 0


def add_commands(sub: Any) -> None:
    """Register `plan` on the CLI's subparsers."""
    p = sub.add_parser("plan", help="per-GPU memory, communication and step time of a layout; the smallest "
                                    "layout that fits")
    p.add_argument("config", help="preset name (configs/<name>.yaml) or YAML path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. deepspeed.zero_stage=2")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", default="h100", help="h100 | h200 | a100")
    p.add_argument("--efficiency", type=float, default=Assumptions.efficiency,
                   help="fraction of the bf16 peak the compute reaches (default %(default)s)")
    p.add_argument("--dedup", type=float, default=Assumptions.dedup,
                   help="fraction of duplicate table ids per micro-batch (default %(default)s)")
    p.add_argument("--usable", type=float, default=Assumptions.usable,
                   help="fraction of HBM a layout may use (default %(default)s)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)
