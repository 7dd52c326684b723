"""Run the recipe's frozen teacher once over K replayable views per image: a target bank.

    python data_prep/precompute_targets.py recipes/cae_v2/vit_l16.yaml --out /banks/in1k-clipb16 \
        --views 10 --encoding fp16
    torchrun --nproc_per_node 8 data_prep/precompute_targets.py RECIPE --out DIR   # data-parallel
    python data_prep/precompute_targets.py RECIPE --out DIR --merge               # after an array job

Train from it with ``teacher.source=precomputed teacher.bank=DIR``. All logic lives in
:mod:`mimscale.targets.precompute`; ``--help`` lists every option.
"""

import sys

from mimscale.targets.precompute import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
