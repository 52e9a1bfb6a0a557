#!/usr/bin/env bash
# The DSVAE baseline on Stochastic Moving MNIST, with run_dsvae.sh's settings (2-core CPU, --amp, conv width 32, batch
# 64, cosine learning rate to 0 over 18 epochs, q(z_t | x, f)) on one channel. Outputs go to runs/dsvae_smmnist/; a
# stopped run continues with ./run_dsvae_smmnist.sh --resume. Score it: MODEL=runs/dsvae_smmnist/model.pt
# ./run_test_smmnist.sh. Extra arguments pass through.
set -euo pipefail
cd "$(dirname "$0")"
DATA=${DATA:-data/smmnist/data.pkl}
LOG_DIR=${LOG_DIR:-runs/dsvae_smmnist}
[ -f "$DATA" ] || python make_smmnist.py --out "$DATA"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # a busy core elsewhere then costs little instead of stalling
python train_cdsvae.py --dataset smmnist --model dsvae --z_input full --data_root "$DATA" --device cpu --amp \
  --nf 32 --batch_size 64 --lr 1e-3 --nEpoch 18 --sche cosine_to_zero --seed 1 --f_dim 256 --z_dim 32 --g_dim 128 \
  --rnn_size 256 --weight_f 1 --weight_z 1 --evl_interval 0 --log_dir "$LOG_DIR" "$@"
