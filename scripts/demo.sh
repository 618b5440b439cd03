#!/usr/bin/env bash
# The main job, end to end on this CPU: set up, write an offline English corpus (CPython's stdlib docs),
# train a Llama-settings tokenizer, tokenize, pretrain the `tiny` Llama 2 from scratch, evaluate it on
# held-out text, then ask it something in chat. Re-running resumes where it stopped.
#   STEPS=600 bash scripts/demo.sh        # train longer;  DEMO_DIR=... to put the run elsewhere
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
W=${DEMO_DIR:-runs/demo}
STEPS=${STEPS:-300}
mkdir -p "$W"
[ -f "$W/corpus.txt" ] || llamactl data corpus --out "$W/corpus.txt"
[ -f "$W/tokenizer/tokenizer.model" ] || llamactl tokenizer train --input "$W/corpus.txt" --out "$W/tokenizer" --vocab-size 2048
[ -f "$W/data/index.json" ] || llamactl data prepare --input "$W/corpus.txt" --tokenizer "$W/tokenizer" --out "$W/data" --val-fraction 0.02
resume=(); [ -f "$W/pretrain/latest" ] && resume=(--resume)
llamactl pretrain --size tiny --data "$W/data" --out "$W/pretrain" --steps "$STEPS" --seq-len 256 --batch-tokens 8192 "${resume[@]}"
llamactl eval --model "$W/pretrain" --data "$W/data"
echo
echo "llamactl chat --model $W/pretrain --prompt 'How do I open a file for reading?'"
llamactl chat --model "$W/pretrain" --prompt "How do I open a file for reading?" --temperature 0.7 --top-p 0.9 --max-new-tokens 80 --seed 0
