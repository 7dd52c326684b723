"""Data: shard writing, manifests, transforms with replayable crops, the WebDataset pipeline.

Import the submodules directly (kept import-light: nothing here imports webdataset)::

    from mimscale.data.pipeline import build_train_loader, build_eval_loader
    from mimscale.data.shards import make_shards          # CLI: mimscale.data.shards_cli
    from mimscale.data.manifest import read_manifest, resolve_source
    from mimscale.data.transforms import replay_crop
    from mimscale.data.synthetic import synthetic_batch

The digits demo shards: :func:`mimscale.demo.data.write_digits_shards`.
"""
