#!/usr/bin/env bash
# The one-command demo (`make demo`): synthetic MMC4 corpus -> tokenizer -> prepared shards ->
# pre-train the tiny LCL model on CPU with 2 gloo ranks -> frozen transfer evaluation -> HF export
# + verification -> summary + loss-curve PNG.
# Everything lands in $DEMO_OUT (default demo_out/). Sizes can be shrunk for CI through the env:
#   DEMO_DOCS (400), DEMO_STEPS (200), DEMO_NPROC (2), DEMO_OUT (demo_out), DEMO_EXTRA (overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${DEMO_OUT:-demo_out}
DOCS=${DEMO_DOCS:-400}
STEPS=${DEMO_STEPS:-200}
NPROC=${DEMO_NPROC:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
start=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - start )) s] $*"; }

step "1/7 synthetic MMC4 corpus ($DOCS documents) -> $OUT/corpus"
[ -f "$OUT/corpus/.done" ] || { $PY -m megatron_lcl.data.synthetic --output "$OUT/corpus" \
    --num-docs "$DOCS" --image-size 48 && touch "$OUT/corpus/.done"; }

step "2/7 tokenizer -> $OUT/tokenizer/lcl.model"
mkdir -p "$OUT/tokenizer"
[ -f "$OUT/tokenizer/lcl.model" ] || $PY tools/train_tokenizer.py --format mmc4 \
    --input "$OUT/corpus" --output "$OUT/tokenizer/lcl" --vocab-size 400

step "3/7 prepared webdataset shards -> $OUT/shards"
[ -f "$OUT/shards/summary.json" ] || $PY tools/prepare_data.py --format mmc4 --input "$OUT/corpus" \
    --output "$OUT/shards" --shard-size 50 --no-progress

step "4/7 pre-train the tiny LCL model: $NPROC gloo ranks on CPU, $STEPS steps -> $OUT/run"
rm -rf "$OUT/run"  # a fresh run each time (a kept run_dir would resume from its checkpoint)
$PY -m torch.distributed.run --standalone --nproc_per_node="$NPROC" pretrain_lcl.py \
    --config examples/configs/tiny_cpu.yaml run_dir="$OUT/run" data.path="$OUT/shards" \
    data.tokenizer="$OUT/tokenizer/lcl.model" train.train_steps="$STEPS" ${DEMO_EXTRA:-}

step "5/7 frozen transfer evaluation on held-out synthetic images -> $OUT/eval"
[ -f "$OUT/eval_corpus/.done" ] || { $PY -m megatron_lcl.data.synthetic --output "$OUT/eval_corpus" \
    --num-docs "${DEMO_EVAL_DOCS:-150}" --image-size 48 --seed 7 && touch "$OUT/eval_corpus/.done"; }
mkdir -p "$OUT/eval"
$PY -m megatron_lcl.eval.classify --encoder "$OUT/run/checkpoints" --data "$OUT/eval_corpus" \
    --epochs "${DEMO_EVAL_EPOCHS:-10}" --output "$OUT/eval/classify.json"
$PY -m megatron_lcl.eval.retrieve --encoder "$OUT/run/checkpoints" --data "$OUT/eval_corpus" \
    --epochs "${DEMO_EVAL_EPOCHS:-10}" --output "$OUT/eval/retrieve.json"

step "6/7 export to HuggingFace -> $OUT/hf, then verify against the checkpoint"
# Written whole, then renamed into place; --overwrite replaces the export of an earlier demo. The
# tokenizer comes from the run directory ($OUT/run/tokenizer.model), not from $OUT/tokenizer.
$PY tools/checkpoint/convert_to_hf.py --load "$OUT/run/checkpoints" --save "$OUT/hf" --overwrite
$PY tools/checkpoint/verify_hf.py --load "$OUT/run/checkpoints" --hf "$OUT/hf"

step "7/7 summary"
$PY -m megatron_lcl.training.summary "$OUT/run" --plot "$OUT/loss_curve.png"
cat <<MSG

outputs:
  run dir:     $OUT/run   (config.yaml, metrics.jsonl, tensorboard/, checkpoints/, tokenizer.model)
  loss curve:  $OUT/loss_curve.png
  evaluation:  $OUT/eval/classify.json, $OUT/eval/retrieve.json
  HF export:   $OUT/hf    (vision/ lm/ tokenizer/ lcl_heads.safetensors README.md)
  TensorBoard: tensorboard --logdir $OUT/run/tensorboard
demo finished in $(( $(date +%s) - start )) s
MSG
