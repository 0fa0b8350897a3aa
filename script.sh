#!/usr/bin/env bash
# The real recipe: HuBERT-large-ls960-ft + TinyLlama-1.1B-Chat-v1.0 on LibriSpeech 960 h, fp16 (PRECISION=bf16
# or no for others), on every visible GPU (one works too), WER on dev-clean during training. Extra arguments pass
# through to finetune.py:
#   bash script.sh                                     # hub copy of LibriSpeech (openslr/librispeech_asr)
#   LIBRISPEECH_DIR=/data/LibriSpeech bash script.sh   # a local LibriSpeech folder (openslr layout)
#   bash script.sh --max_steps 2000 --output_dir out/quick
set -euo pipefail
cd "$(dirname "$0")"

# The precision, from this one place: the launcher's autocast and the backbones' dtype (fp16, bf16 or no)
PRECISION=${PRECISION:-fp16}
case "$PRECISION" in
  fp16) PRECISION_ARGS=(--fp16) ;;
  bf16) PRECISION_ARGS=(--bf16) ;;
  no) PRECISION_ARGS=() ;;
  *) echo "script.sh: PRECISION=$PRECISION: use fp16, bf16 or no" >&2; exit 2 ;;
esac
NUM_GPUS=${NUM_GPUS:-$(python -c "import torch; print(torch.cuda.device_count())")}
if [ "$NUM_GPUS" -lt 1 ]; then
  echo "script.sh is the GPU recipe (fp16 on every GPU), and torch sees no GPU here. On a CPU: python" \
       "proof_of_concept.py (the offline demo), or python finetune.py --use_cpu ... (README, 'Training on a CPU')." >&2
  exit 1
fi
PER_GPU_BATCH=${PER_GPU_BATCH:-8}
# effective batch of 32 clips (~6 minutes of audio) whatever the GPU count
GRAD_ACCUM=$(( (32 + PER_GPU_BATCH * NUM_GPUS - 1) / (PER_GPU_BATCH * NUM_GPUS) ))

if [ -n "${LIBRISPEECH_DIR:-}" ]; then
  DATA=(--librispeech_dir "$LIBRISPEECH_DIR" --train_split train-clean-100,train-clean-360,train-other-500
        --eval_split dev-clean)
else
  DATA=(--dataset_name openslr/librispeech_asr --dataset_config all
        --train_split train.clean.100+train.clean.360+train.other.500 --eval_split validation.clean)
fi

ARGS=(
  --encoder facebook/hubert-large-ls960-ft
  --llm TinyLlama/TinyLlama-1.1B-Chat-v1.0
  --adapter linear --downsample 5 --adapter_hidden 2048
  "${DATA[@]}"
  --output_dir out/slam-asr-hubert-large-tinyllama
  "${PRECISION_ARGS[@]}"
  --per_device_train_batch_size "$PER_GPU_BATCH" --gradient_accumulation_steps "$GRAD_ACCUM"
  --per_device_eval_batch_size 16
  --learning_rate 1e-4 --warmup_steps 1000 --lr_scheduler_type linear --weight_decay 0.0
  --num_train_epochs 3
  --group_by_length
  --max_duration 30 --min_duration 0.5
  --eval_steps 2000 --save_steps 2000 --save_total_limit 3 --logging_steps 50
  # WER during training is greedy (a quick figure); README: beam 4 on test-clean with transcribe.py
  --max_eval_samples 500 --max_new_tokens 200 --generation_num_beams 1
  --metric_for_best_model wer --greater_is_better false
  --report_to tensorboard
)

# Download and index everything, and check every argument, in one plain process first: a mistake is then one
# line, not the launcher's traceback, and in a multi-GPU launch rank 0 would do the downloads while the other
# ranks wait in a collective that --ddp_timeout (30 min) ends before a first download of 960 h is done.
ACCELERATE_MIXED_PRECISION=$PRECISION python finetune.py "${ARGS[@]}" "$@" --preprocessing_only
if [ "$NUM_GPUS" -gt 1 ]; then
  LAUNCH=(accelerate launch --multi_gpu --num_processes "$NUM_GPUS" --mixed_precision "$PRECISION")
else
  LAUNCH=(accelerate launch --num_processes 1 --mixed_precision "$PRECISION")
fi
"${LAUNCH[@]}" finetune.py "${ARGS[@]}" "$@"
