#!/usr/bin/env bash
# Score a C-DSVAE (or DSVAE) checkpoint on every Stochastic Moving MNIST test video with both of its
# shipped judges: fixed content (the digit kept under a prior path), fixed motion (the trajectory
# kept under a new f: centre-of-mass error in px a frame), swaps (the digit of f's video, the path of
# z's video, against chance and the real videos' floor), reconstruction, latent probes (f / z ->
# digit, -> positions), the judges' agreement. Five runs (mean ± std) where --amp finds a native
# half precision, one in fp32 elsewhere (NITER=5 asks for five). Builds the data if missing.
#   MODEL=runs/cdsvae_smmnist/model.pt ./run_test_smmnist.sh [--niter 5] [--device cpu] ...
# Extra arguments pass through to test_sprite.py (and override the ones here).
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${MODEL:-checkpoints/cdsvae_smmnist_cpu.pt}
DATA=${DATA:-data/smmnist/data.pkl}
OUT=${OUT:-runs/test_smmnist/$(basename "$MODEL" .pt).json}
[ -f "$DATA" ] || python make_smmnist.py --out "$DATA"
python test_sprite.py --dataset smmnist --model_dir "$MODEL" --data_root "$DATA" \
  --type_gt all --niter "${NITER:-auto}" --batch_size 256 --amp --out "$OUT" "$@"
