"""``mimscale demo`` and ``mimscale demo-data``: the whole path on a CPU in minutes, on real digits.

- :mod:`mimscale.demo.data` — scikit-learn's digits as train/val WebDataset shards (``demo-data``).
- :mod:`mimscale.demo.run` — pre-train a method's ``cpu_tiny`` recipe on them with the eval hook on.
- :mod:`mimscale.demo.report` — the pre-trained encoder vs the same encoder at random init.
- :mod:`mimscale.demo.teacher` — the supervised digits ViT that CAE v2 / MR-MAE distil from.
- :mod:`mimscale.demo.compare` — several methods like for like (``mimscale demo --compare``).

Import-light: nothing here imports torch until a demo runs.
"""

# `mimscale demo` with no --method. MAE + MTO, not plain MAE: at the demo's budget plain MAE barely
# moves the kNN readout above its random init, MTO lifts it by ~20 points (README "The demo").
DEFAULT_METHOD = "mae_mto"
