"""Stage 4: pretraining on the shared trainer (see trainer/ and README).

    python 4.pretrain.py                                        # CPU demo (tiny preset) / one GPU
    torchrun --nproc_per_node 2 4.pretrain.py --epochs 15
    deepspeed --num_gpus 2 4.pretrain.py --epochs 15 [--deepspeed ds_config.json] [--use_moe]
"""

import sys

from trainer import PretrainTask, run

if __name__ == "__main__":
    sys.exit(run(PretrainTask()))
