#!/usr/bin/env bash
# The DSVAE baseline (Li & Mandt 2018) on the CPU, with the budget and conditions of run_cdsvae_cpu.sh (2-core CPU,
# bf16 autocast, conv width 32, batch 64, Adam 1e-3 with a cosine schedule to 0 over 18 epochs, the same sizes and
# KL weights, seed 1): no augmented views, no InfoNCE or MI terms, DSVAE's "full" posterior q(z_t | x, f)
# (--z_input full). Outputs go to runs/dsvae_cpu/; a stopped run continues with ./run_dsvae.sh --resume. Score it as
# any checkpoint: MODEL=runs/dsvae_cpu/model.pt ./run_test_sprite.sh. Extra arguments pass through.
set -euo pipefail
cd "$(dirname "$0")"
DATA=${DATA:-data/Sprite/data.pkl}
LOG_DIR=${LOG_DIR:-runs/dsvae_cpu}
[ -f "$DATA" ] || python make_sprites.py --out "$DATA"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # a busy core elsewhere then costs little instead of stalling
python train_cdsvae.py --model dsvae --z_input full --data_root "$DATA" --device cpu --amp --nf 32 --batch_size 64 \
  --lr 1e-3 --nEpoch 18 --sche cosine_to_zero --seed 1 --f_dim 256 --z_dim 32 --g_dim 128 --rnn_size 256 \
  --weight_f 1 --weight_z 1 --evl_interval 0 --log_dir "$LOG_DIR" "$@"
