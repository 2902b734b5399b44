# Environment of every training process: sourced by launchers/local.sh and the rendered sbatch script
# (in the batch shell, so srun passes it to every node). The one place for OMP / NCCL / gloo settings.
#
# Inputs (set by the caller): ENGRAM_PROCS_PER_NODE (processes on this node), ENGRAM_BACKEND
# (nccl | gloo | auto). Every variable below keeps a value that is already set, so a site or a user
# overrides it by exporting it before submitting. Site settings that only hold on one cluster
# (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, module loads, ...) go into a file named by ENGRAM_SITE_ENV,
# sourced last; docs/slurm.md lists the usual ones.

: "${ENGRAM_PROCS_PER_NODE:=1}"
: "${ENGRAM_BACKEND:=auto}"

# CPU threads per process: the CPUs SLURM gave this node's task (or the machine's), split over its ranks.
_engram_cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
_engram_threads=$(( _engram_cpus / ENGRAM_PROCS_PER_NODE ))
(( _engram_threads >= 1 )) || _engram_threads=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$_engram_threads}
export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OMP_NUM_THREADS}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
unset _engram_cpus _engram_threads

# Python: unbuffered output so logs stream; tracebacks of hung ranks on SIGABRT/SIGSEGV.
export PYTHONUNBUFFERED=1
export PYTHONFAULTHANDLER=1

# NCCL (GPU): surface errors instead of hanging, dump the flight recorder on a collective timeout.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# CPU-only runs: DeepSpeed's CPU accelerator, no CUDA probing.
if [[ $ENGRAM_BACKEND == gloo ]]; then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi

if [[ -n ${ENGRAM_SITE_ENV:-} ]]; then
    # shellcheck disable=SC1090
    source "$ENGRAM_SITE_ENV"
fi
