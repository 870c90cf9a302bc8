"""Run infrastructure for ``main.py`` and ``checkpoint_tool.py``: process set-up, the flags, run assembly, the
epoch loop, and what keeps a long training run safe and honest around it.

Each module has one job (process set-up, the run assembly, the output directory and its lock, interrupts, resume
compatibility, the end-of-run summary, ...). Nothing here knows a sparsity method's internals; ``engine.py`` stays
the training step.
"""
