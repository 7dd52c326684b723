"""Planning and sweeps: ``mimscale plan`` (memory, fit, cost of a recipe on N GPUs) and
``mimscale sweep`` (a grid of ordinary runs, and a report of accuracy against training compute)."""
