"""`engram-pretrain plan`: per-GPU memory, communication and step time of a run layout, and the search for
the smallest layout that fits (docs/parallelism.md, "Planning a layout")."""
