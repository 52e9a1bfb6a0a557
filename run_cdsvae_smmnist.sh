#!/usr/bin/env bash
# C-DSVAE on Stochastic Moving MNIST with the CPU recipe of run_cdsvae_cpu.sh (2-core CPU, --amp: bf16 where the CPU
# has it natively, fp32 elsewhere; conv width 32, batch 64, cosine learning rate to 0, InfoNCE weights 100, q(z|x) on
# frame deltas, the MI penalty's weight 1 then 10 after step 560, the density-ratio critic at weight 10), on one
# channel, with these differences: the motion view is another digit drawn on the same path (--motion_view digit;
# EXPERIMENTS.md compares it with the stroke view), q(f|x) is not made mirror-invariant (a mirrored digit is another
# shape), and 24 epochs. Outputs go to runs/cdsvae_smmnist/; a stopped run continues with ./run_cdsvae_smmnist.sh
# --resume. Score it: MODEL=runs/cdsvae_smmnist/model.pt ./run_test_smmnist.sh. Extra arguments pass through.
set -euo pipefail
cd "$(dirname "$0")"
DATA=${DATA:-data/smmnist/data.pkl}
LOG_DIR=${LOG_DIR:-runs/cdsvae_smmnist}
[ -f "$DATA" ] || python make_smmnist.py --out "$DATA"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # a busy core elsewhere then costs little instead of stalling
python train_cdsvae.py --dataset smmnist --motion_view digit --data_root "$DATA" --device cpu --amp --nf 32 \
  --batch_size 64 --lr 1e-3 --nEpoch 24 --sche cosine_to_zero --seed 1 --f_dim 256 --z_dim 32 --g_dim 128 \
  --rnn_size 256 --z_input frame_delta --weight_f 1 --weight_z 1 --weight_c_aug 100 --weight_m_aug 100 \
  --weight_mi 1 --weight_mi_after 560 10 --weight_mi_critic 10 --snapshot_every 1 --evl_interval 0 \
  --log_dir "$LOG_DIR" "$@"
