#!/usr/bin/env bash
# Score a C-DSVAE checkpoint with both shipped judges on the whole Sprites test split: protocol A (the paper's
# table), protocol B, swaps, reconstruction, the judges' agreement, 5 runs (mean ± std), bf16 autocast. Builds the
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
  --type_gt all --niter 5 --batch_size 256 --amp --out "$OUT" "$@"
