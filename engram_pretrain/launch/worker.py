"""The torchrun entry point of every rank: check the world that formed, then run `engram-pretrain <args>`.

    torchrun ... -m engram_pretrain.launch.worker train configs/tiny.yaml --resume auto

The launchers export what they asked for; torchrun exports what formed (`WORLD_SIZE`, `GROUP_WORLD_SIZE`
= nodes that joined the rendezvous, `LOCAL_WORLD_SIZE`). Any difference fails here, on every rank, before
any work starts, with both numbers: the classic multi-node failure is every node rendezvousing with itself
(the rendezvous host resolved to localhost) and training silently as a world of one.

    ENGRAM_EXPECTED_WORLD_SIZE     nodes x processes per node
    ENGRAM_EXPECTED_NODES          nodes
    ENGRAM_EXPECTED_GPUS_PER_NODE  GPUs each node must see (0 or unset: no GPU check)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping

EXIT_WORLD = 4
"""Exit code of a rank whose world differs from the one the launcher asked for."""


class WorldMismatchError(RuntimeError):
    """The distributed world that formed is not the one the launcher asked for."""


def _int(env: Mapping[str, str], key: str) -> int | None:
    value = env.get(key)
    return int(value) if value not in (None, "") else None


def check_world(env: Mapping[str, str], cuda_device_count: Callable[[], int] | None = None) -> str:
    """Compare torchrun's world with the launcher's expectation; return a one-line summary.

    Raises WorldMismatchError naming what was asked and what formed."""
    world, nodes = _int(env, "WORLD_SIZE"), _int(env, "GROUP_WORLD_SIZE")
    local = _int(env, "LOCAL_WORLD_SIZE")
    want_world, want_nodes = _int(env, "ENGRAM_EXPECTED_WORLD_SIZE"), _int(env, "ENGRAM_EXPECTED_NODES")
    want_gpus = _int(env, "ENGRAM_EXPECTED_GPUS_PER_NODE") or 0
    host = env.get("SLURMD_NODENAME") or env.get("HOSTNAME") or "this node"
    if want_world is not None and world != want_world:
        raise WorldMismatchError(
            f"world size {world} formed ({nodes} node(s) joined the rendezvous, {local} process(es) on "
            f"{host}), but the launcher asked for {want_world}"
            + (f" = {want_nodes} node(s) x {want_world // want_nodes}" if want_nodes else "")
            + ". If each node formed its own world, the rendezvous host resolved to a local address; "
            "see docs/slurm.md (troubleshooting).")
    if want_nodes is not None and nodes is not None and nodes != want_nodes:
        raise WorldMismatchError(f"{nodes} node(s) joined the rendezvous, the launcher asked for "
                                 f"{want_nodes}")
    if want_gpus > 0 and local is not None:
        count = cuda_device_count() if cuda_device_count is not None else _cuda_device_count()
        if count < local:
            raise WorldMismatchError(
                f"{host} runs {local} process(es) but sees {count} GPU(s) "
                f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '<unset>')}); "
                f"the job asked for {want_gpus} GPU(s) per node")
    return (f"world size {world} = {nodes} node(s) x {local} process(es); rendezvous "
            f"{env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}")


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        summary = check_world(os.environ)
    except WorldMismatchError as err:
        print(f"engram-pretrain: world-size check failed on rank {os.environ.get('RANK', '?')}: {err}",
              file=sys.stderr, flush=True)
        return EXIT_WORLD
    if os.environ.get("RANK", "0") == "0":
        print(f"engram-pretrain: {summary}", flush=True)
    from ..cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
