"""Launching runs: one machine (`engram-pretrain launch`) or a SLURM cluster (`engram-pretrain submit`).

    rendezvous.py  the rendezvous address of a SLURM job, resolved on its first node (fails loudly)
    worker.py      the torchrun entry point of every rank: world-size pre-flight, then the CLI
    local.py       `engram-pretrain launch`: validate the config, exec launchers/local.sh
    slurm.py       `engram-pretrain submit`: render launchers/slurm/train.sbatch.template, run sbatch
    commands.py    the argparse wiring of `launch` and `submit`

The shell side lives in `launchers/`: `local.sh`, `slurm/train.sbatch.template`, `slurm/node.sh` (what
srun runs on each node) and `slurm/env.sh` (the one place for OMP / NCCL / gloo environment).
See docs/slurm.md.
"""
