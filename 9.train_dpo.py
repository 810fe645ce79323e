"""Stage 9: DPO from the SFT checkpoint on preference pairs, on the shared trainer.

    python 9.train_dpo.py --init_from out/sft_mateconv-tiny --pairs_path data/prefs/dpo_pairs_train.jsonl \\
        --eval_pairs_path data/prefs/dpo_pairs_validation.jsonl
    deepspeed --num_gpus=2 9.train_dpo.py --out_dir out_dpo --pairs_path ./dataset/dpo_pairs.jsonl \\
        --epochs 20 --max_steps 1800 --batch_size 16 --learning_rate 1e-4 --beta 0.2 --kl_coef 0.05 \\
        --warmup_ratio 0.06 --accumulation_steps 2 --grad_clip 1.0 --use_wandb

Standard sigmoid DPO with a frozen (or precomputed, ``--precompute_ref``) reference, plus the token-level
KL(policy ‖ reference) on chosen answers (``--kl_coef``) and an optional SFT term on chosen answers
(``--sft_coef``). ``--max_steps`` counts optimizer steps. Logged: TRL's ``rewards/*`` and ``logps/*``,
``kl``, held-out reward accuracy (``pairs/...``) and the forgetting probe (``probe/pretrain_loss``,
``probe/sft_loss``). ``python 9.train_dpo.py --help`` lists every flag; see ``trainer/dpo.py``.
"""

import sys

import trainer
from trainer.dpo import DPOTask

if __name__ == "__main__":
    sys.exit(trainer.run(DPOTask()))
