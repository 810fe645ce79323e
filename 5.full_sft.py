"""Stage 5: full-parameter SFT on the shared trainer, from the pretraining checkpoint of the same model.

    python 5.full_sft.py                                        # CPU demo / one GPU
    deepspeed --num_gpus 2 5.full_sft.py --out_dir out --epochs 5 [--use_moe]
"""

import sys

from trainer import SFTTask, run

if __name__ == "__main__":
    sys.exit(run(SFTTask()))
