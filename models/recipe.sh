#!/usr/bin/env bash
# The recipe of the default model, models/kaiwa: kaiwa's own pipeline, start to end, on the
# starter corpus in data/. About 15 minutes on a quiet 2-core machine, once kaiwa is built (most
# of it the TRAIN_STEPS training steps). Run from anywhere:
#
#   bash models/recipe.sh
#
# 1. import the starter dialogue into a scratch SQLite store (the bot's own store format);
# 2. export it as OpenAI `messages` JSONL with a seeded 5 % validation split (and the Japanese
#    dialogue on its own, plain and under an English system prompt, to weight it 12×: it is 1 %
#    of the dialogue);
# 3. train the byte-level BPE tokenizer (Japanese handling on);
# 4. train the model: the dialogue mixed with the Japanese Tanaka sentences, with the loss on
#    every token (`--objective pretrain`: the users' turns are dialogue to learn from too; at
#    the same cost, held-out replies score 0.42 nats/token better than with the loss on the
#    assistant's turns alone, research/README.md), for TRAIN_STEPS steps of 16 × 256 tokens
#    (a step count rather than a time budget, so the same machine gives the same model bit for
#    bit);
# 5. evaluate it (held-out bits per byte against a byte 5-gram, the ja/en conversation suite);
# 6. copy the model directory to models/kaiwa (weights without the ONNX graph, which the
#    runtime exports from them on first use) with its eval report and training figures.
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${WORK:-target/recipe}
TRAIN_STEPS=${TRAIN_STEPS:-900}
OUT=${OUT:-models/kaiwa}
# KAIWA=path/to/kaiwa uses that binary instead of building one.
if [ -z "${KAIWA:-}" ]; then
    cargo build --release --locked
    KAIWA=target/release/kaiwa
fi
rm -rf "$WORK"
mkdir -p "$WORK"
start=$(date +%s)
step() { echo "== $(( $(date +%s) - start )) s: $*" >&2; }

step "import the starter dialogue"
export DATABASE_URL="sqlite://$WORK/recipe.db"
for f in data/starter/chitchat_en.jsonl.gz data/starter/chatterbot_en.jsonl.gz \
         data/starter/chatterbot_ja.jsonl.gz; do
    "$KAIWA" import "$f" --format openai
done

step "export the corpus"
"$KAIWA" export-corpus --out "$WORK/corpus" --mode bot --val-fraction 0.05 --seed 1
"$KAIWA" export-corpus --out "$WORK/corpus_ja" --mode bot --val-fraction 0.05 --seed 1 --language ja
# The Japanese dialogue once more under the English system prompt of .env.example, so that the
# model answers a Japanese user in Japanese whatever SYSTEM_PROMPT says (evals/bot_language.yaml).
"$KAIWA" export-corpus --out "$WORK/corpus_ja_sys" --mode bot --val-fraction 0.05 --seed 1 --language ja \
    --system "You are kaiwa, a friendly assistant. Answer in the language you are spoken to."

# The Japanese side of the Tanaka pairs (a one-column .tsv: one sentence a document). The
# English side is left out: the dialogue already holds ten times more English.
gzip -dc data/starter/tanaka_ja_en.tsv.gz | cut -f1 > "$WORK/tanaka_ja.tsv"

step "train the tokenizer"
"$KAIWA" train-tokenizer --corpus "$WORK/corpus/train.jsonl" \
    --corpus data/starter/tanaka_ja_en.tsv.gz --vocab-size 8192 --no-compare \
    --out "$WORK/tokenizer"

step "train the model ($TRAIN_STEPS steps)"
ja=()
for _ in 1 2 3 4 5 6; do
    ja+=(--data "$WORK/corpus_ja/train.jsonl" --data "$WORK/corpus_ja_sys/train.jsonl")
done
"$KAIWA" train --out "$WORK/run" --tokenizer "$WORK/tokenizer" \
    --preset small --tie-embeddings true --objective pretrain \
    --data "$WORK/corpus/train.jsonl" "${ja[@]}" --data "$WORK/tanaka_ja.tsv" \
    --validation "$WORK/corpus/validation.jsonl" \
    --context 256 --batch 16 --steps "$TRAIN_STEPS" --lr 2e-3 --min-lr 2e-4 --warmup 30 \
    --eval-every 100 --checkpoint-every 100 --seed 1

step "evaluate"
"$KAIWA" eval --model "$WORK/run/model" --data "$WORK/corpus/validation.jsonl" \
    --report "$WORK/eval"

step "install into $OUT"
rm -rf "$OUT"
mkdir -p "$OUT/eval" "$OUT/training"
for f in config.json generation_config.json model.safetensors tokenizer.json tokenizer_config.json; do
    cp "$WORK/run/model/$f" "$OUT/"
done
cp "$WORK/eval/report.md" "$WORK/eval/report.json" "$OUT/eval/"
cp "$WORK/run/run.json" "$WORK/run/summary.json" "$WORK/run/metrics.jsonl" "$WORK/run/loss.svg" \
    "$OUT/training/"
cp "$WORK/tokenizer/tokenizer_report.md" "$OUT/training/" 2>/dev/null || true
step "done: $OUT"
