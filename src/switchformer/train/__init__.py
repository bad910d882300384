"""Training: one loop (``loop.train``), optimizers and schedules (``optim``), losses (``losses``).

Nothing in the library imports ``switchformer.train``; the CLI does.
"""
