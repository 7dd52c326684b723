"""Write WebDataset shards + manifest from an ImageFolder, a flat folder or a CSV/TSV list.

    python data_prep/make_shards.py --src /data/imagenet/train --out /shards/in1k-train
    python data_prep/make_shards.py --src ... --out ... --short-side 256 --quality 90
    python data_prep/make_shards.py merge --out /shards/in1k-train   # after an array job

All logic lives in :mod:`mimscale.data.shards` (flags in :mod:`mimscale.data.shards_cli`);
``--help`` lists every option.
"""

import sys

from mimscale.data.shards_cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
