#!/usr/bin/env bash
# Re-make the README's example clips (assets/examples/*.ogg) with the shipped model: 8 s, seed 1.
#   recipes/examples.sh [MODEL]
set -euo pipefail
MODEL=${1:-tokenwave-small}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
TOKENWAVE=${TOKENWAVE:-python -m inference}
OUT=$ROOT/assets/examples
mkdir -p "$OUT"
while IFS='|' read -r name prompt; do
    TMP=$(mktemp -d)
    $TOKENWAVE generate "$prompt" --model "$MODEL" --duration 8 --seed 1 -o "$TMP/$name.wav" --force -q
    python -c "import soundfile as sf, sys; a, r = sf.read(sys.argv[1]); sf.write(sys.argv[2], a, r, format='OGG', subtype='VORBIS')" \
        "$TMP/$name.wav" "$OUT/$name.ogg"
    rm -rf "$TMP"
    echo "$name.ogg: $prompt"
done <<'PROMPTS'
piano_ballad|a slow, sad piano ballad in A minor
drums_bass|energetic drums and bass at 140 bpm
bossa_nova|vibraphone bossa nova tune, romantic, around 120 bpm
rock|a rock track with distortion guitar lead, lively and loud
chorale|a slow, solemn Bach chorale for string quartet, violin on the melody, in G minor at 66 bpm
fiddle_tune|an upbeat, cheerful fiddle tune for solo violin in D major, 120 BPM
PROMPTS
