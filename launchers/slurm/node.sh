#!/usr/bin/env bash
# One node of a SLURM training job (srun runs it once per node): torchrun with this node's address and
# per-rank log directory, and SIGUSR1 relayed to the ranks.
#
#   srun --ntasks-per-node=1 bash launchers/slurm/node.sh PYTHON <torchrun arguments...>
#
# torchrun itself ignores SIGUSR1: its own handling would stop the ranks and exit non-zero, and srun
# --kill-on-bad-exit would then kill the nodes still finishing. Instead this script passes SIGUSR1 to
# torchrun's children - the ranks - which checkpoint at the next step boundary and exit 0, so torchrun,
# srun and the job step all end with status 0. SIGTERM (time limit, scancel) keeps torchrun's handling.
set -euo pipefail

python=$1
shift
# The address other nodes reach this one at; torchrun advertises rank 0's as MASTER_ADDR.
local_addr=$("$python" -m engram_pretrain.launch.rendezvous --this-node)

(trap '' USR1; exec "$python" -m torch.distributed.run --local-addr "$local_addr" \
    --log-dir "$ENGRAM_LOG_DIR/node$SLURM_NODEID" "$@") &
torchrun_pid=$!
trap 'pkill -USR1 -P "$torchrun_pid" || true' USR1

# A trapped signal interrupts `wait`; keep waiting until torchrun itself has exited.
while :; do
    status=0
    wait "$torchrun_pid" || status=$?
    kill -0 "$torchrun_pid" 2>/dev/null || break
done
exit "$status"
