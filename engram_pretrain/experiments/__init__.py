"""The paper's experiments as run sets (docs/experiments.md).

- `ablation`: MoE baseline, iso-parameter Engram reference, layer sweep, component ablations (Figure 5);
- `allocation`: the sparsity-allocation sweep at fixed total and activated parameters (Figure 3);
- `budget`: iso-parameter accounting and table-size calibration;
- `plan`: families, planned runs, shared run settings;
- `runner`: configs on disk, skip-finished, local runs or a SLURM array, results collection;
- `commands`: `engram-pretrain experiment ablation|allocation`.
"""
