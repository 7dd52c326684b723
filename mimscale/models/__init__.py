"""Models: ``vit`` (the timm adapter :class:`~mimscale.models.vit.ViTEncoder`), ``decoders``
(MAE's decoder) and ``pos_embed`` (fixed sin-cos tables).

Kept import-free so that ``import mimscale.models`` stays light; import the submodules.
"""
