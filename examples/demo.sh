#!/usr/bin/env bash
# The one-command demo (`make demo`): synthetic MMC4 corpus -> tokenizer -> prepared shards ->
# pre-train the tiny LCL model on CPU with 2 gloo ranks -> summary + loss-curve PNG.
# Everything lands in $DEMO_OUT (default demo_out/). Sizes can be shrunk for CI through the env:
#   DEMO_DOCS (400), DEMO_STEPS (200), DEMO_NPROC (2), DEMO_OUT (demo_out), DEMO_EXTRA (overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${DEMO_OUT:-demo_out}
DOCS=${DEMO_DOCS:-400}
STEPS=${DEMO_STEPS:-200}
NPROC=${DEMO_NPROC:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONWARNINGS=ignore
start=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - start )) s] $*"; }

step "1/5 synthetic MMC4 corpus ($DOCS documents) -> $OUT/corpus"
[ -f "$OUT/corpus/.done" ] || { $PY -m megatron_lcl.data.synthetic --output "$OUT/corpus" \
    --num-docs "$DOCS" --image-size 48 && touch "$OUT/corpus/.done"; }

step "2/5 tokenizer -> $OUT/tokenizer/lcl.model"
mkdir -p "$OUT/tokenizer"
[ -f "$OUT/tokenizer/lcl.model" ] || $PY tools/train_tokenizer.py --format mmc4 \
    --input "$OUT/corpus" --output "$OUT/tokenizer/lcl" --vocab-size 400

step "3/5 prepared webdataset shards -> $OUT/shards"
[ -f "$OUT/shards/summary.json" ] || $PY tools/prepare_data.py --format mmc4 --input "$OUT/corpus" \
    --output "$OUT/shards" --shard-size 50 --no-progress

step "4/5 pre-train the tiny LCL model: $NPROC gloo ranks on CPU, $STEPS steps -> $OUT/run"
rm -rf "$OUT/run"  # a fresh run each time (a kept run_dir would resume from its checkpoint)
$PY -m torch.distributed.run --standalone --nproc_per_node="$NPROC" pretrain_lcl.py \
    --config examples/configs/tiny_cpu.yaml run_dir="$OUT/run" data.path="$OUT/shards" \
    data.tokenizer="$OUT/tokenizer/lcl.model" train.train_steps="$STEPS" ${DEMO_EXTRA:-}

step "5/5 summary"
$PY -m megatron_lcl.training.summary "$OUT/run" --plot "$OUT/loss_curve.png"
cat <<MSG
  evaluation (zero-shot / frozen transfer) will plug in here:  issue "eval"   (not landed yet)
  export to HuggingFace will plug in here: python tools/checkpoint/convert_to_hf.py --load $OUT/run/checkpoints --save $OUT/hf

outputs:
  run dir:     $OUT/run   (config.yaml, metrics.jsonl, tensorboard/, checkpoints/)
  loss curve:  $OUT/loss_curve.png
  TensorBoard: tensorboard --logdir $OUT/run/tensorboard
demo finished in $(( $(date +%s) - start )) s
MSG
