"""Evaluation: kNN, linear probe, fine-tune, export, diagnostics. Import-light (torch only on demand).

- :mod:`mimscale.eval.knn` — weighted kNN (DINO: cosine, k = 20, T = 0.07).
- :mod:`mimscale.eval.linear` — MAE's probe head (BatchNorm w/o affine + Linear), fast fit on cached features.
- :mod:`mimscale.eval.features` — feature extraction split across ranks, all-gathered.
- :mod:`mimscale.eval.hooks` — the ``eval:`` recipe section and the training-loop hook.
- :mod:`mimscale.eval.standalone` — ``mimscale eval CKPT --data ...``.
- ``mimscale finetune`` / ``linprobe`` (:func:`mimscale.cli.cmd_finetune`): method
  :class:`mimscale.methods.finetune.Finetune`, trained by the same engine.
- :mod:`mimscale.eval.export` — ``mimscale export CKPT OUT.safetensors`` (timm keys).
- :mod:`mimscale.eval.diagnostics`, :mod:`mimscale.eval.rauc` — ``mimscale diagnose``.
- :mod:`mimscale.eval.ckpt` — read weights back from any ZeRO stage.
"""
