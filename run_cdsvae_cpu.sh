#!/usr/bin/env bash
# The CPU recipe that trained the shipped checkpoint (2-core CPU, bf16 autocast). Differences from the paper's
# settings (run_cdsvae.sh): conv width 32 instead of 64 (4x fewer conv FLOPs), batch 64, cosine learning rate
# over 18 epochs, InfoNCE weights 100 instead of 10, q(z|x) reads each frame's features minus the video's
# mean frame feature (--z_input frame_delta), q(f|x) is invariant to mirroring the video (--f_mirror), and the
# MI penalty's weight goes from 1 to 10 after epoch 4 (the two stages below; --resume makes them one run).
# Extra arguments pass through.
set -euo pipefail
cd "$(dirname "$0")"
DATA=${DATA:-data/Sprite/data.pkl}
LOG_DIR=${LOG_DIR:-runs/cdsvae_cpu}
[ -f "$DATA" ] || python make_sprites.py --out "$DATA"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # a busy core elsewhere then costs little instead of stalling
recipe=(--data_root "$DATA" --device cpu --amp --nf 32 --batch_size 64 --lr 1e-3 --nEpoch 18 --sche cosine --seed 1
        --f_dim 256 --z_dim 32 --g_dim 128 --rnn_size 256 --z_input frame_delta --f_mirror
        --weight_f 1 --weight_z 1 --weight_c_aug 100 --weight_m_aug 100 --evl_interval 0 --log_dir "$LOG_DIR")
# stage 1: epochs 1-4 (560 steps of 64 videos), MI weight 1
[ -f "$LOG_DIR/model.pt" ] || python train_cdsvae.py "${recipe[@]}" --weight_mi 1 --max_steps 560 "$@"
# stage 2: epochs 5-18, MI weight 10
python train_cdsvae.py "${recipe[@]}" --weight_mi 10 --resume "$@"
