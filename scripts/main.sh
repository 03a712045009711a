#!/usr/bin/env bash
# The main job, offline, a few minutes on 2 CPU cores (outputs under runs/main/):
#   1. quantize the embedded MiniLM-L6 to NF4: size before/after, bits per parameter, reconstruction error;
#   2. QLoRA fine-tune of MiniLM-L6 (NF4 base + LoRA on every linear layer + a new head) on the shipped
#      4-topic data set, accuracy before and after on the held-out split;
#   3. a tiny causal LM built from config, trained on the shipped record -> sentence task, ROUGE before/after;
#   4. compare 16-bit LoRA (A) with QLoRA (B) from the same initial weights and data order.
# Each run directory holds report.md, log.jsonl/log.csv, PNG plots, checkpoints and the trained weights.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
rm -rf runs/main
mkdir -p runs/main

.venv/bin/lowrank quantize --model default
.venv/bin/lowrank finetune --task classification --model default --method qlora --epochs 3 --batch-size 16 --lr 1e-3 --eval-every 18 --save-every 18 --output runs/main/classification
.venv/bin/lowrank finetune --task generation --model tiny-causal --method full --epochs 10 --batch-size 16 --lr 3e-3 --warmup-steps 5 --eval-every 50 --save-every 50 --output runs/main/generation
.venv/bin/lowrank compare --task classification --model default --max-steps 18 --batch-size 16 --lr 2e-3 --a method=lora --b method=qlora --name-a lora16 --name-b qlora --output runs/main/compare

echo "main job done: see runs/main/*/report.md and runs/main/compare/compare.md"
