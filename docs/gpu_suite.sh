#!/usr/bin/env bash
# The GPU suite (bench.py --gpu_suite, docs/PERFORMANCE.md): every GPU figure still open, in one run of at most
# 8 minutes on one GPU. Two steps, on two machines:
#
#   bash docs/gpu_suite.sh wheels      # where pip reaches a registry: what the GPU machine lacks, into .whl/
#   bash docs/gpu_suite.sh run [OUT [--size S --device D]]
#                                      # on the GPU machine, no network needed: installs .whl/*.whl if there,
#                                      # runs the suite under a timeout; OUT/gpu_suite.json, OUT/gpu_suite.log
#                                      # (OUT: $OUT, else out/gpu_suite; the rest goes to bench.py)
#
# The wheels are for this workplace's nvidia-h200 machine (Python 3.12, x86-64; /work/.library/device/KINDS.md):
# it has torch, accelerate, tokenizers, safetensors, sentencepiece and tensorboard, but transformers 5.17, and no
# soundfile, soxr or deepspeed. About 20 MB; .whl/ is git-ignored and travels as carried files.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  transformers==5.24.0  # trainer.py overrides private Trainer methods, tested against 5.23-5.24
  soundfile==0.14.0 cffi==2.0.0 pycparser==3.0  # flac in and out (audio.py, bench.py)
  soxr==1.1.0  # resampling (audio.py)
  hjson==3.1.0 pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2  # deepspeed's
)
SUITE_SECONDS=480  # bench.GPU_SUITE_SECONDS: the suite starts no item that would not end before it

case "${1:-}" in
  wheels)
    rm -rf .whl && mkdir .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
    # DeepSpeed publishes its source only: built here into a pure-Python wheel with no ops compiled (the ZeRO-2 run
    # needs none: its optimizer is Trainer's torch AdamW); DeepSpeed finds the GPU when it runs there.
    DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
    du -ch .whl/*.whl | tail -1
    ;;
  run)
    out=${2:-${OUT:-out/gpu_suite}}
    shift $(($# < 2 ? $# : 2))
    mkdir -p "$out"
    if compgen -G ".whl/*.whl" > /dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; } \
      | tee "$out/gpu_suite.log"
    # timeout's SIGTERM reaches the suite and its runs: the item under way is written as cut short, the ones
    # before stay in the file
    set +e
    timeout -k 20 "$SUITE_SECONDS" python3 bench.py --gpu_suite --json "$out/gpu_suite.json" "$@" 2>&1 \
      | tee -a "$out/gpu_suite.log"
    exit "${PIPESTATUS[0]}"
    ;;
  *)
    echo "usage: bash docs/gpu_suite.sh wheels | run [OUT [--size S --device D]]" >&2
    exit 2
    ;;
esac
