"""Training: optimizers (row-sparse Adam for Engram tables, Muon), parameter groups, LR schedules."""
