"""Distributed layout (world = data parallel x expert parallel): process groups, expert-parallel token
dispatch, row-sharded Engram tables. `model/` never imports this package; `train/` builds these objects and
hands them to the model."""
