"""mimscale: masked image modeling pre-training at cluster scale.

Importing this package is light: deepspeed, wandb, open_clip and webdataset are imported
lazily by the modules that need them.
"""

__version__ = "0.1.0"
