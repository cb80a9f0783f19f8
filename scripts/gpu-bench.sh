#!/usr/bin/env bash
# The learner's step on a lent GPU machine, which has torch (Python 3.12) but no Ray, Redis,
# MetaWorld, transformers or peft, and no package index. Two halves:
#
#   scripts/gpu-bench.sh wheels   here: Python 3.12 wheels of transformers, peft and what they
#                                 import (not torch) into .gpu-wheels/ (~28 MB, gitignored)
#   scripts/gpu-bench.sh run      there, as the device tool's command with carry [".gpu-wheels"]:
#                                 installs them offline, then prints one JSON line per bench
#                                 (tiny model, and the VLA backend on a SmolVLM-256M-shaped random
#                                 base with the expert trained in full and LoRA'd) into $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.gpu-wheels
PKGS=(transformers==5.24.0 peft==0.21.2 accelerate huggingface_hub hf_xet tokenizers safetensors regex pyyaml
      psutil filelock fsspec tqdm packaging typer click shellingham rich markdown-it-py mdurl pygments
      annotated-doc httpx2 httpcore2 h11 anyio idna typing_extensions)

case "${1:-}" in
  wheels)
    mkdir -p "$WHEELS"
    for p in "${PKGS[@]}"; do  # one by one, --no-deps: torch must never come along
      python3 -m pip download -q --no-deps "$p" -d "$WHEELS" --python-version 3.12 --only-binary=:all: \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
    done
    du -sh "$WHEELS"
    ;;
  run)
    out="${OUT:-/tmp/gpu-bench}"; mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
    export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
    bench() { python3 -m fleetloop.cli bench learner --device cuda --json "$@" 2>>"$out/stderr.log" | tail -n 1; }
    python3 -m fleetloop.cli vla make-tiny --family idefics3 --preset smolvlm-256m --out /tmp/smolvlm-256m \
      2>>"$out/stderr.log"
    {
      bench --size base --batch-size 256
      bench --backend vla --base /tmp/smolvlm-256m --batch-size 32 --set expert_layers=15
      bench --backend vla --base /tmp/smolvlm-256m --batch-size 32 --set expert_layers=15 --set gradient_checkpointing=true
      bench --backend vla --base /tmp/smolvlm-256m --batch-size 32 --set expert_layers=15 --set expert_mode=lora
    } | tee "$out/bench.jsonl"
    ;;
  *) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
