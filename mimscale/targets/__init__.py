"""Precomputed teacher targets (docs/methods.md §6.1, the FKD recipe for dense MIM targets).

The frozen teacher runs once over K replayable views per image (:mod:`.precompute`); training
with ``teacher.source: precomputed`` replays one stored view per image and epoch pixel-exactly
and decodes its stored targets on the device (:mod:`.provider`). The bank format is
:mod:`.bank`, the encodings :mod:`.encoding`, the recipe checks :mod:`.check`.

Import-light: nothing here imports torch at package import.
"""
