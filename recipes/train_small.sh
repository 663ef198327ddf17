#!/usr/bin/env bash
# Train a small text-to-music model end to end, from nothing, with tokenwave alone:
#
#   1. render a captioned corpus of procedural MIDI songs with fluidsynth (32 kHz mono),
#   2. train a small 32 kHz EnCodec codec on it         (tokenwave train-codec),
#   3. tokenize the corpus with that codec               (tokenwave prepare),
#   4. train a small MusicGen-style LM from scratch      (tokenwave finetune --from-scratch),
#      conditioned by a lookup table over the caption words (no T5 download needed;
#      set T5=/path/to/t5-base to use a local T5 folder instead),
#   5. generate one sample from a text prompt            (tokenwave generate).
#
# A finished step leaves a marker ($OUT/codec/.done, $OUT/lm/.done) and is skipped on a re-run; an
# interrupted one resumes from its last checkpoint (delete a step's folder to redo it). Note: on
# CPU keep OMP_NUM_THREADS at or below the free cores (the script defaults it to 1 on CPU): with
# more threads than free cores the codec ran over 10x slower in our trial.
#
# Usage (from the repository root, with tokenwave installed or its venv active):
#
#   recipes/train_small.sh                                  # GPU defaults below
#   # small CPU setting (~8 min on 2 shared cores: 10 min of audio, 0.57 M-parameter codec,
#   # 0.29 M-parameter "tiny" LM); it proves the pipeline, it does not make music:
#   OUT=/tmp/run HOURS=0.17 CODEC_STEPS=240 CODEC_BATCH=4 CODEC_FILTERS=8 CODEC_LSTM=0 \
#     CODEBOOK_SIZE=1024 DISC_FILTERS=8 LM_SIZE=tiny LM_STEPS=150 LM_BATCH=8 LM_LR=1e-3 \
#     LM_WARMUP=15 WORKERS=1 DEVICE=cpu recipes/train_small.sh
#
# Scale knobs (environment variables, defaults for one GPU):
#   OUT            run folder (default runs/train_small); everything is written below it
#   HOURS          hours of audio to render (default 10)
#   CODEC_STEPS    codec training steps (default 20000)
#   LM_STEPS       LM optimizer steps (default 20000)
#   DEVICE         cuda (default when nvidia-smi finds a GPU) or cpu
# Finer knobs:
#   CODEC_FILTERS  SEANet width n_filters (default 32; encodec_32khz uses 64)
#   CODEC_LSTM     LSTM layers in the SEANet bottleneck (default 2; 0 is much cheaper)
#   CODEBOOKS      residual codebooks (default 4, as encodec_32khz / MusicGen)
#   CODEBOOK_SIZE  codes per codebook (default 2048)
#   CODEC_BATCH    codec clips per step (default 16)       CODEC_SEGMENT  seconds (default 1)
#   DISC_FILTERS   discriminator width (default 32; 8 for CPU trials)
#   LM_SIZE        LM preset: tiny, musicgen_small, ... (default musicgen_small)
#   LM_BATCH       LM samples per step (default 16)        LM_SEGMENT     seconds (default 10)
#   LM_LR          LM peak learning rate (default 5e-4)    LM_WARMUP      steps (default 500)
#   T5             local T5 folder for the text conditioner (default: caption-word lookup table)
#   PROMPT         prompt of the final sample; DURATION its seconds (default 8)
#   WORKERS        corpus render processes and codec data loaders (default: CPU count)
#   TOKENWAVE      the command to run (default: `tokenwave` if on PATH, else `python -m inference`)
#
# Outputs: $OUT/corpus (wav + captions), $OUT/codec/train_log.jsonl and the codec $OUT/codec/codec,
# $OUT/cache (tokens), $OUT/lm/logs/train.jsonl and the generator $OUT/lm/model, $OUT/sample.wav.
#
# Expect at the CPU setting (~0.7 codec steps/s, ~22k LM tokens/s): a codec with negative SI-SNR
# whose codebooks have collapsed to a handful of codes, and an LM that has learned little beyond
# those codes' statistics: noise-like audio. Audible results need roughly the GPU defaults
# (hours of audio, 1e4+ steps each, batch 16+ clips so the quantizer sees enough latents per step).
set -euo pipefail

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    DEFAULT_DEVICE=cuda
else
    DEFAULT_DEVICE=cpu
fi
OUT=${OUT:-runs/train_small}
HOURS=${HOURS:-10}
CODEC_STEPS=${CODEC_STEPS:-20000}
LM_STEPS=${LM_STEPS:-20000}
DEVICE=${DEVICE:-$DEFAULT_DEVICE}
CODEC_FILTERS=${CODEC_FILTERS:-32}
CODEC_LSTM=${CODEC_LSTM:-2}
CODEBOOKS=${CODEBOOKS:-4}
CODEBOOK_SIZE=${CODEBOOK_SIZE:-2048}
CODEC_BATCH=${CODEC_BATCH:-16}
CODEC_SEGMENT=${CODEC_SEGMENT:-1}
DISC_FILTERS=${DISC_FILTERS:-32}
LM_SIZE=${LM_SIZE:-musicgen_small}
LM_BATCH=${LM_BATCH:-16}
LM_SEGMENT=${LM_SEGMENT:-10}
LM_LR=${LM_LR:-5e-4}
LM_WARMUP=${LM_WARMUP:-500}
T5=${T5:-}
PROMPT=${PROMPT:-"upbeat pop song with piano and drums"}
DURATION=${DURATION:-8}
WORKERS=${WORKERS:-$(nproc)}
if [[ -z "${TOKENWAVE:-}" ]]; then
    if command -v tokenwave >/dev/null 2>&1; then TOKENWAVE=tokenwave; else TOKENWAVE="python -m inference"; fi
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# `python -m inference` from a source checkout: make the repository's packages importable.
export PYTHONPATH="$(dirname "$HERE")${PYTHONPATH:+:$PYTHONPATH}"

# Periodic validation/checkpoints: ~10 per run, at least every step for tiny runs.
every() { local n=$(( $1 / 10 )); echo $(( n > 0 ? n : 1 )); }
CPU_FLAG=(); [[ "$DEVICE" == cpu ]] && { CPU_FLAG=(--cpu); export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; }
MP=no; [[ "$DEVICE" != cpu ]] && MP=bf16
stamp() { echo "[train_small $(date +%H:%M:%S)] $*"; }
mkdir -p "$OUT"

stamp "1/5 corpus: $HOURS h of 10 s clips at 32 kHz mono -> $OUT/corpus"
python "$HERE/corpus/make_corpus.py" --out "$OUT/corpus" --hours "$HOURS" --sample-rate 32000 \
    --channels 1 --workers "$WORKERS"

# The held-out share of the corpus validates the codec; the LM holds out its own share of items.
CODEC_VALID=()
[[ -d "$OUT/corpus/valid" ]] && CODEC_VALID=(--valid "$OUT/corpus/valid")
CODEC_DATA="$OUT/corpus"; [[ -d "$OUT/corpus/train" ]] && CODEC_DATA="$OUT/corpus/train"

CODEC="$OUT/codec/codec"  # train-codec also rewrites it at every checkpoint, hence the marker
if [[ -e "$OUT/codec/.done" ]]; then
    stamp "2/5 codec: done earlier ($OUT/codec/.done), skipped"
else
    RESUME=(); CODEC_ARCH=(--preset encodec_32khz --set n_filters="$CODEC_FILTERS"
        --set lstm="$CODEC_LSTM" --set num_codebooks="$CODEBOOKS" --set codebook_size="$CODEBOOK_SIZE" --name codec)
    [[ -d "$OUT/codec/checkpoints" ]] && { RESUME=(--resume); CODEC_ARCH=(); }
    stamp "2/5 codec: encodec_32khz n_filters=$CODEC_FILTERS lstm=$CODEC_LSTM K=$CODEBOOKS x $CODEBOOK_SIZE, $CODEC_STEPS steps"
    $TOKENWAVE train-codec "$CODEC_DATA" --out "$OUT/codec" "${CODEC_ARCH[@]}" "${RESUME[@]}" \
        "${CODEC_VALID[@]}" --steps "$CODEC_STEPS" --batch-size "$CODEC_BATCH" \
        --segment-seconds "$CODEC_SEGMENT" --disc-filters "$DISC_FILTERS" \
        --valid-every "$(every "$CODEC_STEPS")" --checkpoint-every "$(every "$CODEC_STEPS")" \
        --log-every "$(every "$CODEC_STEPS")" --num-workers "$WORKERS" --mixed-precision "$MP" "${CPU_FLAG[@]}"
    touch "$OUT/codec/.done"
fi

if [[ -e "$OUT/cache/index.json" ]]; then
    stamp "3/5 prepare: $OUT/cache exists, skipped"
else
    stamp "3/5 prepare: tokenizing $CODEC_DATA with $CODEC"
    $TOKENWAVE prepare "$CODEC_DATA" --model "$CODEC" --out "$OUT/cache" \
        --segment-seconds "$LM_SEGMENT" --device "$DEVICE" --force
fi

if [[ -e "$OUT/lm/.done" ]]; then
    stamp "4/5 LM: done earlier ($OUT/lm/.done), skipped"
else
    LM_ARGS=(--data "$OUT/cache" --from-scratch "$LM_SIZE")
    [[ -n "$T5" ]] && LM_ARGS+=(--t5 "$T5")
    [[ -f "$OUT/lm/run.json" ]] && LM_ARGS=(--resume)
    stamp "4/5 LM: $LM_SIZE from scratch, $LM_STEPS steps of $LM_BATCH x $LM_SEGMENT s"
    $TOKENWAVE finetune "${LM_ARGS[@]}" --out "$OUT/lm" --steps "$LM_STEPS" \
        --batch-size "$LM_BATCH" --lr "$LM_LR" --warmup "$LM_WARMUP" --segment-seconds "$LM_SEGMENT" \
        --eval-every "$(every "$LM_STEPS")" --save-every "$(every "$LM_STEPS")" \
        --log-every "$(every "$LM_STEPS")" "${CPU_FLAG[@]}"
    touch "$OUT/lm/.done"
fi

stamp "5/5 generate: \"$PROMPT\" ($DURATION s) -> $OUT/sample.wav"
$TOKENWAVE generate --model "$OUT/lm/model" --duration "$DURATION" --device "$DEVICE" \
    --force -o "$OUT/sample.wav" "$PROMPT"
stamp "done: $OUT/sample.wav"
