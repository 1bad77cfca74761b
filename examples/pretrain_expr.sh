#!/usr/bin/env bash
# CLeBS expression encoder (avatar pretrain-expr) on the StyleTalk clips, on one or more GPUs.
#
#   bash examples/pretrain_expr.sh            # one GPU
#   NGPU=8 bash examples/pretrain_expr.sh     # DDP over 8 GPUs of this host (torchrun)
#
# Multi-node: run the same torchrun line on every node with --nnodes N --node-rank K
# --rdzv-backend c10d --rdzv-endpoint HOST:PORT instead of --standalone (the run folder must be on
# a shared file system). Rerunning the same command resumes from the latest checkpoint in
# encoder.h5.run/ (also after a crash or Ctrl-C); TensorBoard: tensorboard --logdir out/encoder.h5.run.
set -euo pipefail

ASSETS=${AVATAR_ASSETS:-../shared/assets}
STYLETALK=$ASSETS/data/styletalk
OUT=${OUT:-out}
NGPU=${NGPU:-1}
export AVATAR_MODELS=${AVATAR_MODELS:-$ASSETS/models}
mkdir -p "$OUT"

# 1. 25-fps face crops with landmarks (identity = file name without [digit]_clipN, so furious_talk1/2 are one; the landmarks feed the
#    expression-retention probe). StyleTalk's videos have Deep3DFaceRecon coefficients beside them.
avatar preprocess "$STYLETALK/source/video" "$STYLETALK/style/video" -o "$OUT/styletalk_clips.h5" \
    --identity-from 'regex:([^/]+?)(?:\d?_clip_?\d+\w*)?\.mp4$' --device cuda

# 2. CLeBS: defaults are Export3D's (n=10, d=256, 32 negatives from the same clip, tau=0.07, Adam 1e-4,
#    60k steps); bf16 autocast on CUDA, torch.compile, EMA of the weights.
ARGS=(pretrain-expr "$OUT/styletalk_clips.h5" --coeffs "$STYLETALK/source/3dmm" --coeffs "$STYLETALK/style/3dmm"
      -o "$OUT/encoder.h5" --steps 60000 --batch-clips 32 --negatives 32 --image-size 112
      --compile --ema-decay 0.999 --checkpoint-every 1000
      --export-embeddings "$OUT/expr_embeddings.h5" --device cuda)
if [ "$NGPU" -gt 1 ]; then
    torchrun --standalone --nproc-per-node "$NGPU" -m avatarcli "${ARGS[@]}"
else
    avatar "${ARGS[@]}"
fi

# 3. What it learned: probe scores (identity leak and expression retention of beta and beta'),
#    the weights and the basis; the PCA plot is $OUT/encoder.embedding.png.
avatar info "$OUT/encoder.h5"
