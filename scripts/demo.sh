#!/usr/bin/env bash
# The main job, end to end on this CPU: set up .venv, then `llamactl demo`: the whole Llama 2-Chat recipe
# on the verifiable task suite (tokenizer, pretrain, SFT, simulated preferences, helpfulness and safety
# reward models, rejection sampling, PPO, GAtt, report), every step a printed `llamactl` command, ending
# with the table of held-out scores per stage, the report's path and a one-shot chat answer.
# Re-running continues where it stopped (Ctrl-C or a crash): finished stages are kept.
#   MINUTES=30 bash scripts/demo.sh      # a longer budget (nominal minutes, default 12);  DEMO_DIR=... elsewhere
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
llamactl demo --out "${DEMO_DIR:-runs/demo}" --minutes "${MINUTES:-12}" --seed "${SEED:-0}"
