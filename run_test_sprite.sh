#!/usr/bin/env bash
# Score a C-DSVAE checkpoint with both shipped judges on the whole Sprites test split: protocol A (the paper's
# table), protocol B, swaps, reconstruction, latent probes, the judges' agreement. Five runs (mean ± std) where
# --amp finds a native half precision (a GPU; a CPU with AVX-512 BF16 or AMX: 280 s there), one run in fp32 on
# other CPUs (AVX2: five runs of fp32 work do not fit in 5 minutes); NITER=5 asks for five anywhere. Builds the
# data if missing.
#   MODEL=runs/cdsvae_cpu/model.pt ./run_test_sprite.sh [--niter 5] [--device cpu] [--threads 2] ...
# Extra arguments pass through to test_sprite.py (and override the ones here).
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${MODEL:-checkpoints/cdsvae_sprites_cpu.pt}
DATA=${DATA:-data/Sprite/data.pkl}
OUT=${OUT:-runs/test_sprite/$(basename "$MODEL" .pt).json}
[ -f "$DATA" ] || python make_sprites.py --out "$DATA"
python test_sprite.py --model_dir "$MODEL" --data_root "$DATA" \
  --type_gt all --niter "${NITER:-auto}" --batch_size 256 --amp --out "$OUT" "$@"
