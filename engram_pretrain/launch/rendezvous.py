"""The rendezvous address of a SLURM job, resolved on a compute node of the job.

    python -m engram_pretrain.launch.rendezvous              # the job's rendezvous address, e.g. 10.1.4.17
    python -m engram_pretrain.launch.rendezvous --this-node  # this node's address (torchrun --local-addr)

Both exit 1 with the reason when the address cannot be trusted.

The host is the first node of `SLURM_JOB_NODELIST` (`scontrol show hostnames`); its address is the node's
`NodeAddr` from `scontrol show node` (the name SLURM itself uses to reach it), resolved with the system
resolver. Failures are loud instead of silent:

- the name does not resolve -> error naming the node and the address tried;
- it resolves to a loopback address (e.g. Debian's `127.0.1.1 <hostname>` line in /etc/hosts) while the
  job spans several nodes whose addresses differ -> error, because every node would rendezvous with
  itself and form a world of one. A single machine emulating several nodes (all NodeAddr loopback, as in
  the test cluster) is allowed.

`ENGRAM_RDZV_HOST` overrides the host (it must still resolve), e.g. to pick an interface's name.

Each node also passes its own address to torchrun (`--local-addr`): the node hosting rank 0 advertises it
as `MASTER_ADDR` to every rank, and torchrun's default (`socket.getfqdn()`) is `localhost` on hosts whose
/etc/hosts maps the hostname to a loopback address.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
from collections.abc import Mapping


class RendezvousError(RuntimeError):
    """The rendezvous host of the job cannot be determined or would not work across nodes."""


def _scontrol(*args: str) -> str:
    try:
        out = subprocess.run(["scontrol", *args], check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise RendezvousError("scontrol not found: run this inside a SLURM job") from None
    except subprocess.CalledProcessError as err:
        raise RendezvousError(f"scontrol {' '.join(args)} failed: {err.stderr.strip()}") from None
    return out.stdout


def expand_nodelist(nodelist: str) -> list[str]:
    """`n[1-3],gpu7` -> [n1, n2, n3, gpu7] (through `scontrol show hostnames`)."""
    hosts = _scontrol("show", "hostnames", nodelist).split()
    if not hosts:
        raise RendezvousError(f"SLURM node list {nodelist!r} expands to no hosts")
    return hosts


def node_address(node: str) -> str:
    """The `NodeAddr` SLURM has for `node` (the node name when SLURM does not report one)."""
    for field in _scontrol("show", "node", "-o", node).split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1] or node
    return node


def resolve(host: str) -> str:
    """IPv4 (else IPv6) address of `host`; RendezvousError naming it when it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise RendezvousError(
            f"rendezvous host {host!r} does not resolve on {socket.gethostname()}: {err.strerror}. "
            "Check DNS / /etc/hosts on the compute nodes, or set ENGRAM_RDZV_HOST to a name that "
            "resolves to an address all nodes can reach.") from None
    addresses = [info[4][0] for info in infos]
    ipv4 = [a for a in addresses if ":" not in a]
    return (ipv4 or addresses)[0]


def is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def rendezvous_host(env: Mapping[str, str] | None = None) -> str:
    """The address every node of this job should use as the torchrun rendezvous endpoint."""
    env = os.environ if env is None else env
    override = env.get("ENGRAM_RDZV_HOST")
    if override:
        return resolve(override)
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise RendezvousError("SLURM_JOB_NODELIST is not set: not inside a SLURM allocation "
                              "(set ENGRAM_RDZV_HOST to launch elsewhere)")
    hosts = expand_nodelist(nodelist)
    head_addr = node_address(hosts[0])
    address = resolve(head_addr)
    if len(hosts) > 1 and is_loopback(address):
        others = {h: resolve(node_address(h)) for h in hosts[1:]}
        if set(others.values()) != {address}:
            listed = ", ".join(f"{h}={a}" for h, a in list(others.items())[:4])
            raise RendezvousError(
                f"rendezvous host {hosts[0]} (NodeAddr {head_addr}) resolves to the loopback address "
                f"{address} on {socket.gethostname()}, but the job spans {len(hosts)} nodes ({listed}): "
                "the other nodes could not reach it and each node would form a world of its own. Fix the "
                "host's /etc/hosts entry (Debian maps the hostname to 127.0.1.1) or set ENGRAM_RDZV_HOST.")
    return address


def this_node_address(env: Mapping[str, str] | None = None) -> str:
    """This node's address as the other nodes reach it (its SLURM `NodeAddr`, resolved)."""
    env = os.environ if env is None else env
    node = env.get("SLURMD_NODENAME")
    if not node:
        raise RendezvousError("SLURMD_NODENAME is not set: run this inside a SLURM job step")
    address = resolve(node_address(node))
    if is_loopback(address) and int(env.get("SLURM_JOB_NUM_NODES", "1")) > 1:
        head = expand_nodelist(env.get("SLURM_JOB_NODELIST", node))[0]
        if resolve(node_address(head)) != address:
            raise RendezvousError(
                f"node {node} resolves to the loopback address {address} in a multi-node job; the other "
                "nodes could not reach its ranks. Fix its /etc/hosts entry or SLURM's NodeAddr.")
    return address


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        print(this_node_address() if "--this-node" in argv else rendezvous_host())
    except RendezvousError as err:
        print(f"engram-pretrain: rendezvous error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
