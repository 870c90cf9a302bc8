"""Run infrastructure for ``main.py``: what keeps a long training run safe and honest around the training loop.

Each module has one job (the output directory and its lock, interrupts, resume compatibility, the end-of-run
summary, ...). Nothing here knows a sparsity method's internals; ``engine.py`` stays the training step.
"""
