#!/usr/bin/env bash
# One machine, N processes: `torchrun --standalone` running `engram-pretrain <args>` on every rank, with
# the environment of launchers/slurm/env.sh and the world-size pre-flight of engram_pretrain.launch.worker.
#
#   launchers/local.sh --nproc 2 train configs/tiny.yaml train.steps=100
#   launchers/local.sh --nproc 4 --log-dir runs/tiny/logs/local train tiny --resume auto
#
# `engram-pretrain launch <config> --nproc N [overrides]` validates the config first and calls this.
# --log-dir DIR also writes every rank's stdout/stderr to DIR/<run id>/attempt_0/<local rank>/.
# SIGTERM / SIGUSR1 reach every rank (the trainer checkpoints at the next step and exits).
# PYTHON selects the interpreter (default: the repository's .venv, else python3).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
usage="usage: launchers/local.sh [--nproc N] [--log-dir DIR] [--] <engram-pretrain command> [args...]"
nproc=1
log_dir=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --nproc) nproc=${2:?$usage}; shift 2 ;;
        --log-dir) log_dir=${2:?$usage}; shift 2 ;;
        --) shift; break ;;
        -h|--help) echo "$usage"; exit 0 ;;
        -*) echo "unknown option $1; $usage" >&2; exit 2 ;;
        *) break ;;
    esac
done
[[ $# -gt 0 ]] || { echo "$usage" >&2; exit 2; }
[[ $nproc =~ ^[1-9][0-9]*$ ]] || { echo "error: --nproc must be a positive integer, got '$nproc'" >&2; exit 2; }

if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi

export ENGRAM_PROCS_PER_NODE=$nproc
export ENGRAM_BACKEND=${ENGRAM_BACKEND:-auto}
# shellcheck source=slurm/env.sh
source "$REPO/launchers/slurm/env.sh"
export ENGRAM_EXPECTED_NODES=1 ENGRAM_EXPECTED_WORLD_SIZE=$nproc

torchrun_args=(--standalone --nnodes 1 --nproc-per-node "$nproc"
               --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
               --shutdown-timeout "${ENGRAM_SHUTDOWN_TIMEOUT:-120}")
if [[ -n $log_dir ]]; then
    mkdir -p "$log_dir"
    torchrun_args+=(--log-dir "$log_dir" --redirects 3 --tee 3)
fi
exec "$PYTHON" -m torch.distributed.run "${torchrun_args[@]}" -m engram_pretrain.launch.worker "$@"
