"""Benchmarks, one module per ``mimscale bench WHAT`` (each has ``main(argv)`` and prints JSON).

- :mod:`mimscale.bench.engine` — ``mimscale bench [engine]``: engine step vs bare step, images/s, MFU.
- :mod:`mimscale.bench.data` — ``mimscale bench data``: decode + augment images/s per worker.
- :mod:`mimscale.bench.teacher` — ``mimscale bench teacher``: the frozen teacher's share of a step.
- :mod:`mimscale.bench.methods` — ``mimscale bench methods``: LC-MAE vs MAE, MTO vs its host.
- :mod:`mimscale.bench.common` — the shared ``[RECIPE] key=value ... --steps --out`` parsing and JSON output.

Import-light: nothing here imports torch until a benchmark runs.
"""
