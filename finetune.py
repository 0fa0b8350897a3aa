"""
Trains the SLAM-ASR adapter (frozen HuBERT + frozen LLM) on LibriSpeech or a manifest with Hugging Face
Trainer. Runs under `python`, `accelerate launch` (one GPU, multi-GPU, multi-node, DeepSpeed) and `torchrun`.

    accelerate launch finetune.py --librispeech_dir /data/LibriSpeech --train_split train-clean-100 \
        --eval_split dev-clean --output_dir out --fp16 ...          (see script.sh for the full recipe)
    python finetune.py --encoder tiny --llm tiny --librispeech_dir tests/fixtures/LibriSpeech \
        --output_dir out --use_cpu --max_steps 20                   (offline pipeline check, seconds on CPU)

Every argument can also come from a JSON or YAML file, with the same defaults: `python finetune.py args.json`
(arguments after the file override it).
"""

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field, fields
from glob import glob

import torch
import transformers
from accelerate.utils import gather_object
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm
from transformers import HfArgumentParser, Seq2SeqTrainingArguments, Trainer, TrainerCallback
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_pt_utils import BatchRebalanceSampler, LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

import data
from model import CONFIG_NAME, DEFAULT_PROMPT_TEMPLATE, WEIGHTS_NAME, SlamASR, SlamASRConfig

logger = logging.getLogger("finetune")
COMPLETE_MARKER = "checkpoint_complete.json"  # written last: a checkpoint without it is a torn write
LOCK_NAME = ".finetune.lock"  # in output_dir, held by the run writing there


@dataclass
class ModelArguments:
    encoder: str = field(default=SlamASRConfig.encoder,
                         metadata={"help": "Speech encoder: hub name, local folder, or 'tiny' (random, offline)."})
    llm: str = field(default=SlamASRConfig.llm,
                     metadata={"help": "Causal LM: hub name, local folder, or 'tiny' (random, offline)."})
    adapter: str = field(default="linear", metadata={"help": "Adapter kind.", "choices": ["linear", "conv"]})
    downsample: int = field(default=5, metadata={"help": "Encoder frames per speech embedding."})
    adapter_hidden: int = field(default=2048, metadata={"help": "Hidden width of the adapter."})
    prompt_template: str = field(default=DEFAULT_PROMPT_TEMPLATE,
                                 metadata={"help": "LLM prompt with exactly one <speech>; the transcript follows it."})
    trust_remote_code: bool = field(default=False,
                                    metadata={"help": "Allow backbones whose hub repo ships its own code."})


@dataclass
class DataArguments:
    librispeech_dir: str | None = field(default=None, metadata={
        "help": "Local LibriSpeech root holding split folders (openslr layout)."})
    dataset_name: str | None = field(default=None, metadata={
        "help": "Hub dataset with LibriSpeech's schema, e.g. openslr/librispeech_asr."})
    dataset_config: str | None = field(default=None, metadata={
        "help": "Config of --dataset_name: clean, other or all."})
    streaming: bool = field(default=False, metadata={
        "help": "Stream --dataset_name instead of downloading it first: clips are decoded and filtered as they "
                "arrive (needs --max_steps); the first --max_eval_samples clips of the eval split are held in memory."})
    shuffle_buffer_size: int = field(default=1000, metadata={
        "help": "With --streaming: clips held in the shuffle buffer (undecoded, ~0.3 MB each); 0 keeps the "
                "stream's order."})
    train_split: str = field(default="train-clean-100", metadata={
        "help": "Training split: comma-separated folder names with --librispeech_dir (train-clean-100,"
                "train-clean-360); a split name with --dataset_name (train.clean.100+train.clean.360)."})
    eval_split: str | None = field(default=None, metadata={
        "help": "Evaluation split, named like --train_split (dev-clean by default with --librispeech_dir; needed "
                "with --dataset_name, e.g. validation.clean); empty for none. With --train_manifest: "
                "--eval_manifest."})
    train_manifest: str | None = field(default=None, metadata={
        "help": 'JSON-lines training manifest: {"audio": path, "text": ...} per line (paths relative to it).'})
    eval_manifest: str | None = field(default=None, metadata={"help": "JSON-lines evaluation manifest."})
    max_eval_samples: int | None = field(default=200, metadata={
        "help": "Clips of the eval split used for eval loss and WER (all if unset)."})
    max_new_tokens: int = field(default=200, metadata={"help": "Generation limit per clip for eval WER."})
    min_duration: float = field(default=0.5, metadata={"help": "Drop clips shorter than this (seconds)."})
    max_duration: float = field(default=30.0, metadata={"help": "Drop clips longer than this (seconds)."})
    max_target_tokens: int = field(default=256, metadata={
        "help": "Truncate transcripts to this many tokens (EOS included); truncations are counted."})
    lowercase: bool = field(default=True, metadata={"help": "Lower-case transcripts (LibriSpeech is upper case)."})
    group_by_length: bool = field(default=False, metadata={
        "help": "Batch clips of similar duration together (less padding)."})
    max_batch_seconds: float | None = field(default=None, metadata={
        "help": "Training batches by audio duration instead of clip count: clips of similar duration together, "
                "at most this many padded audio seconds per batch and GPU (replaces --per_device_train_batch_size "
                "in training; the least padding of all)."})
    strict_data: bool = field(default=False, metadata={
        "help": "Stop on the first bad clip or index entry instead of skipping and counting it."})
    feature_cache: str | None = field(default=None, metadata={
        "help": "Folder for the frozen encoder's outputs (fp16, about 100 KB per audio second for HuBERT-large): "
                "computed once before training (each rank its share), then every epoch trains from it."})
    max_nonfinite_steps: int = field(default=25, metadata={
        "help": "Stop after this many consecutive steps with a NaN/Inf loss (each one is skipped)."})
    preprocessing_only: bool = field(default=False, metadata={
        "help": "Download the backbones and the data and index it, in this one process, then exit. Run it once "
                "before a multi-GPU launch (script.sh does): there, rank 0 does this while the other ranks wait "
                "in a collective that --ddp_timeout (30 min) ends, too soon for a first download of 960 h."})


# ----------------------------------------------------------------------------------------------------------
# Trainer: the library's, with adapter-only checkpoints, generation-based WER and a few guards


class StopOnSignal(TrainerCallback):
    """SIGTERM/SIGINT (preemption, Ctrl-C): save a checkpoint and stop, at the end of the step or at the next
    batch of an evaluation (a WER pass takes minutes, past a typical 30 s preemption grace period)."""

    def __init__(self):
        self.received = None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def requested(self, args):
        """Whether any rank received a signal. Every rank must ask at the same point: it is an all-reduce, so that
        all stop together, or the save's collectives hang."""
        flag = torch.tensor(float(self.received is not None), device=args.device)
        if args.world_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item():
            self.received = self.received or "signal on another rank"
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested(args):
            control.should_save = True
            control.should_training_stop = True

    def on_prediction_step(self, args, state, control, **kwargs):
        # Trainer's eval-loss loop checks no flag: an exception leaves it (SlamASRTrainer.evaluate saves)
        if self.requested(args):
            raise StopDuringEvaluation(self.received)

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class DurationBatchSampler(BatchRebalanceSampler):
    """This rank's share of `data.duration_batches`, batched anew each epoch. Trainer gives a
    BatchRebalanceSampler to the DataLoader as its batch sampler and keeps accelerate from splitting it over
    ranks again, which is what a rank-aware sampler of variable-size batches needs; the parent's fixed-size
    balancing is not used, so its __init__ is not called."""

    JITTER_SECONDS = 0.1  # enough for other neighbours to share a batch each epoch; costs ~1% padding

    def __init__(self, durations, max_batch_seconds, rank=0, world=1, seed=0):
        self.durations, self.max_batch_seconds = durations, max_batch_seconds
        self.rank, self.world, self.seed, self.epoch = rank, world, seed, 0
        # the batch count moves a little with the jitter: fix it, so every rank and epoch has the same length
        self.batches_per_rank = len(self.all_batches(0)) // world
        if self.batches_per_rank == 0:
            raise ValueError(f"--max_batch_seconds {max_batch_seconds:g} gives fewer batches than the "
                             f"{world} processes: lower it")

    def all_batches(self, epoch):
        return data.duration_batches(self.durations, self.max_batch_seconds, self.seed + epoch,
                                     jitter=self.JITTER_SECONDS)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.batches_per_rank

    def __iter__(self):
        batches = self.all_batches(self.epoch)
        needed = self.batches_per_rank * self.world
        batches = (batches * (needed // len(batches) + 1))[:needed]  # cut (or wrap) to an equal share per rank
        return iter(batches[self.rank::self.world])


class SlamASRTrainer(Trainer):
    def __init__(self, *args, wer_dataset=None, max_new_tokens=200, num_beams=1, max_nonfinite_steps=25,
                 max_batch_seconds=None, **kwargs):
        self.max_batch_seconds = max_batch_seconds  # read while Trainer builds its loaders
        self.stop = StopOnSignal()
        super().__init__(*args, callbacks=[*(kwargs.pop("callbacks", None) or []), self.stop], **kwargs)
        self.wer_dataset = wer_dataset
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.max_nonfinite_steps = max_nonfinite_steps
        self.data_counts = {"samples": 0, "skipped": 0, "truncated": 0, "nonfinite_steps": 0}
        self.filtered = Counter()  # per reason, clips a stream dropped while training (indexed data: up front)
        self.consecutive_nonfinite = 0
        # Trainer rotates checkpoints before our completion marker is written, and by a glob that takes the
        # user's checkpoint-best along (transformers 5.23, in _save_checkpoint and at the end of train()):
        # it gets no limit, and rotate_checkpoints applies ours.
        self.save_total_limit, self.args.save_total_limit = self.args.save_total_limit, None

    # --- data bookkeeping and non-finite steps -------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        stats = inputs.pop("data_stats")
        if model.training:
            self.data_counts["samples"] += len(inputs["labels"])
            self.data_counts["skipped"] += len(stats["skipped"])
            self.data_counts["truncated"] += stats["truncated"]
            self.filtered.update(stats["filtered"])
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = torch.tensor(float(not torch.isfinite(loss)), device=loss.device)
        if self.args.world_size > 1:  # all ranks skip together, or DDP replicas drift apart
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if not bad.item():
            self.consecutive_nonfinite = 0
            return loss
        # fp16: the grad scaler finds the same non-finite gradients, skips the step and lowers its scale; it
        # must see them, so they stay. Otherwise dropping the gradients makes the optimizer skip every
        # parameter (no moment update, no decay). Either way the step is counted: Trainer's
        # logging_nan_inf_filter shows a NaN loss as the running mean, so the count is what says it happened.
        if self.accelerator.scaler is None:
            for p in model.parameters():
                p.grad = None
        self.data_counts["nonfinite_steps"] += 1
        self.consecutive_nonfinite += 1
        logger.warning(f"step {self.state.global_step}: non-finite loss, step skipped "
                       f"({self.data_counts['nonfinite_steps']} so far)")
        if self.consecutive_nonfinite >= self.max_nonfinite_steps:
            raise NonFiniteTraining(
                f"{self.consecutive_nonfinite} consecutive steps had a NaN/Inf loss; stopping. The last checkpoint "
                f"in {self.args.output_dir} is intact. Try a lower --learning_rate, bf16 instead of fp16, or "
                "--strict_data to find a bad clip.")
        return loss

    def log(self, logs, start_time=None):
        if "loss" in logs:  # training logs carry the running data counters (this rank's)
            logs = {**logs, "skipped_clips": self.data_counts["skipped"],
                    "nonfinite_steps": self.data_counts["nonfinite_steps"]}
        super().log(logs, start_time)

    def get_train_dataloader(self):
        if not isinstance(self.train_dataset, data.StreamingSpeechDataset):
            return super().get_train_dataloader()
        # The stream splits itself over ranks; accelerate's prepare() would split it again (or have rank 0
        # read for everyone), so the loader stays plain and Trainer moves each batch to the device.
        args = self.args
        workers = min(args.dataloader_num_workers, self.train_dataset.shards_per_rank)
        return torch.utils.data.DataLoader(
            self.train_dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator,
            num_workers=workers, pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers and workers > 0,
            prefetch_factor=args.dataloader_prefetch_factor if workers > 0 else None)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.max_batch_seconds:
            return DurationBatchSampler(dataset.durations, self.max_batch_seconds, self.args.process_index,
                                        self.args.world_size, self.args.seed)
        if self.args.train_sampling_strategy == "group_by_length":
            # durations are the lengths: grouping by them is what cuts the padding
            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=dataset.durations)
        return super()._get_train_sampler(train_dataset)

    def _get_eval_sampler(self, eval_dataset):
        if self.args.train_sampling_strategy == "group_by_length":
            return LengthGroupedSampler(self.args.eval_batch_size, lengths=eval_dataset.durations)
        return super()._get_eval_sampler(eval_dataset)

    # --- adapter-only checkpoints --------------------------------------------------------------------------

    def _save(self, output_dir=None, state_dict=None):
        if self.args.should_save:
            self.accelerator.unwrap_model(self.model).save_adapter(output_dir or self.args.output_dir)

    def _save_optimizer_and_scheduler(self, output_dir):
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        from accelerate.utils import DeepSpeedSchedulerWrapper

        # The engine's checkpoint would also hold the frozen backbones (gigabytes); Trainer leaves them out only
        # for PEFT models, so say it here. The scheduler is Trainer's own unless the DeepSpeed config names one.
        self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _save_checkpoint(self, model, trial):
        # transformers 5.23: Trainer._save_checkpoint writes checkpoint-N (adapter, optimizer, scheduler, RNG,
        # trainer state), then rotates by args.save_total_limit, which __init__ set to None: rotation is ours.
        run_dir = self._get_output_dir(trial)
        path = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save and os.path.isdir(path):
            # left by an earlier run that went further (this one resumed from before it): its marker would vouch
            # for a mix of its files and ours if we were killed halfway through writing
            logger.warning(f"replacing {path}, written by an earlier run that went past this step")
            shutil.rmtree(path)
        self.accelerator.wait_for_everyone()  # gone before any rank writes into it
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()  # every rank's RNG state is on disk before the marker
        if self.args.should_save:
            mark_complete(path, self.state.global_step)
            self.rotate_checkpoints(run_dir, keep=path)

    def rotate_checkpoints(self, run_dir, keep):
        """Trainer's rotation, but only once the new checkpoint is complete (a kill in between must not leave
        nothing to resume from) and only over our complete checkpoint-<N> folders, oldest step first; `keep`
        (the one just saved) and the best model's are never deleted."""
        if not self.save_total_limit:
            return
        complete, _ = find_checkpoints(run_dir)
        protected = {os.path.abspath(p) for p in (keep, self.state.best_model_checkpoint) if p}
        deletable = [p for p in complete if os.path.abspath(p) not in protected]
        for path in deletable[:max(len(complete) - max(self.save_total_limit, len(protected)), 0)]:
            logger.info(f"deleting {path} (--save_total_limit {self.save_total_limit})")
            shutil.rmtree(path)

    def _load_adapter_weights(self, directory):
        model = self.accelerator.unwrap_model(self.model)
        loaded = SlamASR.load_adapter(directory, model.encoder, model.llm, model.tokenizer, model.feature_extractor)
        model.adapter.load_state_dict(loaded.adapter.state_dict(), strict=True)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        self._load_adapter_weights(resume_from_checkpoint)

    def _load_best_model(self):
        self._load_adapter_weights(self.state.best_model_checkpoint)

    # --- evaluation: loss from Trainer, WER from real generation ---------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        try:
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            if self.wer_dataset is not None:
                wer = {f"{metric_key_prefix}_{k}": v for k, v in self.generate_and_score().items()}
                self.log(wer)
                metrics.update(wer)
        except StopDuringEvaluation:
            # Trainer (5.23) would save only after this evaluation and the next step: save now, on every rank (they
            # agreed to stop at this batch), then leave train()
            if self.is_in_train:
                self._save_checkpoint(self.model, trial=None)
            raise
        return metrics

    def generate_and_score(self):
        """Transcribes the WER clips (sharded over ranks), writes predictions, returns WER and counts."""
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        rank, world = self.args.process_index, self.args.world_size
        rows, failed = [], []
        records = self.wer_dataset.records[rank::world]
        batch_size = self.args.per_device_eval_batch_size
        # as many batches on every rank (a shorter share ends on an empty one), so that all can agree on a stop
        batches = math.ceil(math.ceil(len(self.wer_dataset.records) / world) / batch_size)
        for start in tqdm(range(0, batches * batch_size, batch_size), desc="eval WER",
                          disable=not self.is_world_process_zero()):
            if self.stop.requested(self.args):
                raise StopDuringEvaluation(self.stop.received)
            batch, audios, bad = data.load_clips(self.wer_dataset.load, records[start:start + batch_size])
            failed += [(record["id"], reason) for record, reason in bad]
            if audios:
                hyps = model.transcribe(audios, batch_size=batch_size, max_new_tokens=self.max_new_tokens,
                                        num_beams=self.num_beams)
                rows += [dict(id=r["id"], reference=r["text"], hypothesis=h) for r, h in zip(batch, hyps)]
        model.train(was_training)
        rows = gather_object(rows) if world > 1 else rows
        failed = gather_object(failed) if world > 1 else failed
        scores = data.word_error_rate([r["reference"] for r in rows], [r["hypothesis"] for r in rows])
        if self.args.should_save:
            path = os.path.join(self.args.output_dir, f"predictions_step{self.state.global_step}.jsonl")
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                for row in sorted(rows, key=lambda r: r["id"]):
                    f.write(json.dumps(row) + "\n")
            if failed:
                logger.warning(f"eval WER: {len(failed)} clips could not be read and were left out, e.g. {failed[0]}")
        decoding = "greedy" if self.num_beams == 1 else f"beam search, {self.num_beams} beams"
        logger.info(f"eval WER {100 * scores['wer']:.2f}% on {len(rows)} clips ({decoding}, "
                    f"max {self.max_new_tokens} new tokens)")
        return {"wer": scores["wer"], "wer_substitutions": scores["substitutions"],
                "wer_deletions": scores["deletions"], "wer_insertions": scores["insertions"],
                "wer_num_beams": self.num_beams}


class NonFiniteTraining(RuntimeError):
    pass


class StopDuringEvaluation(Exception):
    """A stop signal came during an evaluation; the step's checkpoint is saved as it leaves train()."""


# ----------------------------------------------------------------------------------------------------------


def checkpoint_is_complete(path):
    return os.path.isfile(os.path.join(path, COMPLETE_MARKER))


def mark_complete(path, global_step):
    with open(os.path.join(path, COMPLETE_MARKER + ".tmp"), "w") as f:
        json.dump({"global_step": global_step}, f)
    os.replace(os.path.join(path, COMPLETE_MARKER + ".tmp"), os.path.join(path, COMPLETE_MARKER))


@contextlib.contextmanager
def hold_output_dir(output_dir, holder=True):
    """An exclusive lock on output_dir for the run's life: a second run into it fails at once instead of mixing
    its checkpoints with ours. Held by the process that writes checkpoints (`holder`; rank 0, or each node's
    first process with --save_on_each_node). fcntl.flock rather than the filelock package: the kernel drops it
    when the process dies, SIGKILL included, where filelock's fallback soft lock would stay behind stale."""
    if not holder:
        yield
        return
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, LOCK_NAME), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise RuntimeError(f"{output_dir} is in use by another run ({f.read().strip() or 'holder unknown'}): "
                               "wait for it to end, or choose another --output_dir") from None
        except OSError as e:  # a filesystem without locks (some network mounts): warn, do not refuse to train
            logger.warning(f"cannot lock {output_dir} ({e}): nothing stops a second run from writing into it")
        else:
            f.truncate(0)
            f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            f.flush()
        yield


def find_checkpoints(output_dir):
    """(complete, torn) checkpoint folders of output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return [], []
    # checkpoint-<digits> folders only: a user's checkpoint-best or checkpoint-4.bak is none of ours
    steps = {n: int(m.group(1)) for n in os.listdir(output_dir)
             if (m := re.fullmatch(PREFIX_CHECKPOINT_DIR + r"-(\d+)", n))
             and os.path.isdir(os.path.join(output_dir, n))}
    paths = [os.path.join(output_dir, n) for n in sorted(steps, key=steps.get)]
    return [p for p in paths if checkpoint_is_complete(p)], [p for p in paths if not checkpoint_is_complete(p)]


def checkpoint_problem(path):
    """Why a complete checkpoint cannot be resumed from (a file missing, truncated or unparsable), or None.
    Trainer resumes with a fresh optimizer and the LR at its peak when optimizer.pt or scheduler.pt is missing,
    so they are required. Reads no pickle: a torch.save file is a zip archive whose checksums give away a
    truncated or damaged file."""
    if os.path.isfile(os.path.join(path, "latest")):  # DeepSpeed: its engine files hold the optimizer state
        with open(os.path.join(path, "latest")) as f:
            tag = f.read().strip()
        required = [os.path.join(tag, "mp_rank_00_model_states.pt")]
        if not glob(os.path.join(path, tag, "*optim_states.pt")):
            return f"{tag}/ holds no DeepSpeed optimizer states (*optim_states.pt)"
    else:
        required = [OPTIMIZER_NAME, SCHEDULER_NAME]
    for name in (WEIGHTS_NAME, CONFIG_NAME, TRAINER_STATE_NAME, *required):
        if not os.path.isfile(os.path.join(path, name)):
            return f"{name} is missing"
    try:
        with safe_open(os.path.join(path, WEIGHTS_NAME), "pt"):
            pass
    except (SafetensorError, OSError) as e:
        return f"{WEIGHTS_NAME} is unreadable ({e})"
    try:
        SlamASRConfig.from_json_file(os.path.join(path, CONFIG_NAME))
    except ValueError as e:  # the message names the file
        return str(e)
    try:
        with open(os.path.join(path, TRAINER_STATE_NAME)) as f:
            json.load(f)
    except ValueError as e:
        return f"{TRAINER_STATE_NAME} is not valid JSON ({e})"
    for file in sorted(glob(os.path.join(path, "**", "*.pt*"), recursive=True)):
        name = os.path.relpath(file, path)
        try:
            with zipfile.ZipFile(file) as archive:
                damaged = archive.testzip()
        except (zipfile.BadZipFile, OSError) as e:
            return f"{name} is truncated or not a torch.save file ({e})"
        if damaged:
            return f"{name} is damaged ({damaged} fails its checksum)"
    return None


def config_differences(saved, current):
    """'field: checkpoint X, this run Y' for each SlamASRConfig field that differs. A field this run has left
    None is filled in when the backbones load, so there is nothing to compare yet."""
    return [f"{f.name}: checkpoint {getattr(saved, f.name)!r}, this run {getattr(current, f.name)!r}"
            for f in fields(SlamASRConfig)
            if getattr(current, f.name) is not None and getattr(saved, f.name) != getattr(current, f.name)]


def resolve_resume(training_args, config):
    """--resume_from_checkpoint PATH or `last` (the newest intact checkpoint); refuses torn or broken
    checkpoints, silently mixed runs, and a checkpoint of another model config than `config`."""
    complete, torn = find_checkpoints(training_args.output_dir)
    resume = training_args.resume_from_checkpoint
    if resume is None:
        if complete:
            raise ValueError(f"{training_args.output_dir} already holds {os.path.basename(complete[-1])}: pass "
                             "--resume_from_checkpoint last to continue that run, or choose another --output_dir")
        return None
    if resume in ("last", "true", "True"):
        if not complete:
            raise ValueError(f"--resume_from_checkpoint {resume}: no complete checkpoint in {training_args.output_dir}")
        skipped = []
        for path in reversed(complete):
            problem = checkpoint_problem(path)
            if problem is None:
                break
            logger.warning(f"--resume_from_checkpoint {resume}: skipping {path}: {problem}")
            skipped.append(f"{os.path.basename(path)}: {problem}")
        else:
            raise ValueError(f"--resume_from_checkpoint {resume}: no intact checkpoint in {training_args.output_dir} "
                             f"({'; '.join(skipped)})")
        resume = path
    elif not checkpoint_is_complete(resume):
        raise ValueError(f"{resume} is not a complete checkpoint (no {COMPLETE_MARKER}: the run was killed while "
                         "saving it, or it is not a checkpoint folder); resume from an earlier one")
    elif problem := checkpoint_problem(resume):
        raise ValueError(f"cannot resume from {resume}: {problem}; resume from an earlier checkpoint (`last` "
                         "takes the newest intact one)")
    differences = config_differences(SlamASRConfig.from_json_file(os.path.join(resume, CONFIG_NAME)), config)
    if differences:
        raise ValueError(f"{resume} was trained with another model config than this run's: "
                         + "; ".join(differences) + ". Pass the checkpoint's values (the same command as its run), "
                         "or start a new --output_dir")
    if torn and training_args.should_save:
        for path in torn:  # half-written by a killed run; left in place they would be rotated in as if good
            logger.warning(f"removing incomplete checkpoint {path}")
            shutil.rmtree(path)
    return resume


def load_split(data_args, split, manifest, sampling_rate, what, max_samples=None):
    """One dataset from whichever source the arguments name."""
    report = data.DataReport(f"{what} data")
    hub_dataset = None
    if manifest:
        records = data.read_manifest(manifest, report)
    elif data_args.librispeech_dir:
        records = data.index_librispeech(data_args.librispeech_dir, split, report)
    elif data_args.dataset_name:
        hub = data.load_hub_librispeech(data_args.dataset_name, data_args.dataset_config, split,
                                        streaming=data_args.streaming)
        if data_args.streaming:  # an eval split is small: its first clips are held in memory, then indexed
            import datasets

            rows = list(tqdm(hub.take(max_samples) if max_samples is not None else hub, total=max_samples,
                             desc=f"reading {what} clips from the stream"))
            hub = datasets.Dataset.from_list(rows)
        records, hub_dataset = data.records_from_hub(hub, report)
    else:
        raise ValueError("no data: pass --librispeech_dir, --dataset_name or --train_manifest")
    if max_samples is not None:
        records = records[:max_samples]
    return data.build_dataset(what, records, report, data_args.min_duration, data_args.max_duration,
                              data_args.lowercase, hub_dataset, data_args.strict_data, sampling_rate)


def load_train_stream(data_args, training_args, sampling_rate):
    """The training split of --dataset_name as a stream: this rank's part, decoded and filtered on the fly."""
    stream = data.load_hub_librispeech(data_args.dataset_name, data_args.dataset_config, data_args.train_split,
                                       streaming=True)
    return data.StreamingSpeechDataset(
        stream, training_args.process_index, training_args.world_size, training_args.seed,
        data_args.shuffle_buffer_size, data_args.min_duration, data_args.max_duration, data_args.lowercase,
        data_args.strict_data, sampling_rate)


def parse_args(argv):
    """Our dataclasses and Seq2SeqTrainingArguments, from the command line or a JSON/YAML file (then the command
    line's overrides), with the same defaults either way; refuses what would waste a run, by name."""
    parser = HfArgumentParser((ModelArguments, DataArguments, Seq2SeqTrainingArguments))
    # defaults this model needs (each still overridable where it makes sense)
    parser.set_defaults(output_dir="output", report_to="tensorboard", learning_rate=1e-4, warmup_steps=1000,
                        lr_scheduler_type="linear", eval_strategy="steps", eval_steps=1000, save_steps=1000,
                        save_total_limit=3, logging_steps=50, predict_with_generate=True, do_train=True,
                        do_eval=True, remove_unused_columns=False, ddp_find_unused_parameters=False,
                        prediction_loss_only=True, dataloader_num_workers=4)
    if argv and argv[0].endswith((".json", ".yaml", ".yml")):
        # The file's values become the parser's defaults and the rest of argv parses on top, so a file gets the
        # defaults above and takes overrides after it, exactly as the command line does. (HfArgumentParser's
        # parse_json_file/parse_yaml_file fill the dataclasses from the file alone, without set_defaults; its
        # args_filename/args_file_flag read command-line words, not JSON or YAML.)
        with open(argv[0], encoding="utf-8") as f:
            if argv[0].endswith(".json"):
                values = json.load(f)
            else:
                import yaml

                values = yaml.safe_load(f)
        known = {spec.name for dataclass_type in parser.dataclass_types for spec in fields(dataclass_type) if spec.init}
        if not isinstance(values, dict):
            raise ValueError(f"{argv[0]} must hold a mapping of argument names to values")
        if set(values) - known:
            raise ValueError(f"{argv[0]}: unknown arguments {sorted(set(values) - known)} (python finetune.py --help "
                             "lists them)")
        parser.set_defaults(**values)
        argv = argv[1:]
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    for name in ("generation_max_length", "generation_config"):
        if getattr(training_args, name) is not None:
            raise ValueError(f"--{name} is not used by finetune.py: set --max_new_tokens and --generation_num_beams")
    if training_args.sortish_sampler:
        raise ValueError("--sortish_sampler is not used by finetune.py: use --group_by_length")
    if training_args.remove_unused_columns:
        raise ValueError("--remove_unused_columns must stay False: the collator's batch is what the model takes")
    if data_args.streaming:
        conflicts = dict(train_manifest=data_args.train_manifest, librispeech_dir=data_args.librispeech_dir,
                         group_by_length=data_args.group_by_length, max_batch_seconds=data_args.max_batch_seconds,
                         feature_cache=data_args.feature_cache)
        given = [f"--{name}" for name, value in conflicts.items() if value]
        if not data_args.dataset_name or given:
            raise ValueError("--streaming reads --dataset_name as it downloads, with no index of the clips: it needs "
                             "--dataset_name and cannot be combined with " + (", ".join(given) or
                             "--train_manifest, --librispeech_dir, --group_by_length, --max_batch_seconds or "
                             "--feature_cache"))
        if training_args.max_steps <= 0:
            raise ValueError("--streaming has no epoch length to count: set --max_steps (e.g. 960 h of LibriSpeech "
                             "at 16 clips x 8 GPUs per step is about 2,200 steps per epoch)")
    sources = [f"--{name}" for name in ("librispeech_dir", "dataset_name", "train_manifest")
               if getattr(data_args, name)]
    if len(sources) != 1:
        raise ValueError(f"{' and '.join(sources)}: train on one data source" if sources else
                         "no data: pass --librispeech_dir, --dataset_name or --train_manifest")
    if data_args.eval_split and data_args.eval_manifest:
        raise ValueError("--eval_split and --eval_manifest: evaluate on one of them")
    if data_args.train_manifest and data_args.eval_split:
        raise ValueError(f"--eval_split {data_args.eval_split} names a split of --librispeech_dir or --dataset_name: "
                         "with --train_manifest, evaluate on --eval_manifest (or on nothing)")
    if data_args.eval_split is None and not data_args.eval_manifest:
        if data_args.librispeech_dir:
            data_args.eval_split = "dev-clean"
        elif data_args.dataset_name:
            raise ValueError("--dataset_name needs --eval_split (openslr/librispeech_asr: validation with "
                             "--dataset_config clean or other, validation.clean with all), or --eval_split '' for "
                             "no evaluation")
    # numbers that would waste a run (an untrained adapter, a crash at the first evaluation), refused by name
    t, d, m = training_args, data_args, model_args
    ranges = [
        ("max_steps", t.max_steps, t.max_steps != 0, "a step count, or -1 to train --num_train_epochs"),
        ("num_train_epochs", t.num_train_epochs, t.max_steps > 0 or t.num_train_epochs > 0, "> 0, or set --max_steps"),
        ("per_device_train_batch_size", t.per_device_train_batch_size, t.per_device_train_batch_size >= 1, ">= 1"),
        ("per_device_eval_batch_size", t.per_device_eval_batch_size, t.per_device_eval_batch_size >= 1, ">= 1"),
        ("max_new_tokens", d.max_new_tokens, d.max_new_tokens >= 1, ">= 1"),
        ("max_target_tokens", d.max_target_tokens, d.max_target_tokens >= 2, ">= 2: a text token and EOS"),
        ("max_nonfinite_steps", d.max_nonfinite_steps, d.max_nonfinite_steps >= 1, ">= 1"),
        ("min_duration", d.min_duration, d.min_duration >= 0, ">= 0"),
        ("max_duration", d.max_duration, d.max_duration > d.min_duration, f"> --min_duration {d.min_duration:g}"),
        ("max_eval_samples", d.max_eval_samples, d.max_eval_samples is None or d.max_eval_samples >= 1,
         ">= 1, or unset for the whole split"),
        ("shuffle_buffer_size", d.shuffle_buffer_size, d.shuffle_buffer_size >= 0, ">= 0"),
        ("downsample", m.downsample, m.downsample >= 1, ">= 1"),
        ("adapter_hidden", m.adapter_hidden, m.adapter_hidden >= 1, ">= 1"),
    ]
    wrong = [f"--{name} {value:g} (must be {rule})" for name, value, ok, rule in ranges if not ok]
    if wrong:
        raise ValueError("out of range: " + "; ".join(wrong))
    if data_args.max_batch_seconds is not None:
        if data_args.max_batch_seconds <= 0 or data_args.group_by_length:
            raise ValueError("--max_batch_seconds must be positive, and already groups by duration: drop "
                             "--group_by_length")
    if data_args.group_by_length:
        training_args.train_sampling_strategy = "group_by_length"
    if not (data_args.eval_split or data_args.eval_manifest) or not training_args.do_eval:
        training_args.eval_strategy = "no"
        training_args.do_eval = False
    return model_args, data_args, training_args


def describe_batches(trainer):
    """One epoch of training batches as Trainer will draw them (this rank's, for duration batches): count,
    mean size, padding. Read from durations alone, under a forked RNG so that training draws the same."""
    durations = trainer.train_dataset.durations
    with torch.random.fork_rng():
        sampler = trainer._get_train_sampler()
        if isinstance(sampler, DurationBatchSampler):
            batches = list(sampler)
        else:  # a sampler of clips, cut into batches of the per-device size (ranks take turns)
            order, size = list(sampler), trainer._train_batch_size
            batches = [order[i:i + size] for i in range(0, len(order), size)]
    seconds = sum(durations[i] for b in batches for i in b)
    return (f"{len(batches):,} batches per epoch{' per process' if isinstance(sampler, DurationBatchSampler) else ''}"
            f", {sum(map(len, batches)) / len(batches):.1f} clips and {seconds / len(batches):.0f} audio s each on "
            f"average, {100 * data.padding_fraction(durations, batches):.1f}% of the padded audio is padding")


def fill_feature_cache(model, train_dataset, data_args, training_args):
    """Encodes the training clips once (each rank its share), then trains from the cache."""
    from accelerate import PartialState

    cache = data.FeatureCache(data_args.feature_cache, model.config.encoder, model.sampling_rate,
                              model.encoder.config.hidden_size, next(model.encoder.parameters()).dtype)
    model.to(training_args.device)
    # encoders that take no attention mask must see each clip unpadded
    failed = cache.fill(model.encode_audio, train_dataset, training_args.process_index, training_args.world_size,
                        training_args.per_device_eval_batch_size, batched=model.encoder_takes_mask)
    if failed:
        logger.warning(f"feature cache: {len(failed)} clips could not be read and are left out, e.g. {failed[0]}")
    PartialState().wait_for_everyone()
    cache.load_index()
    cached = data.CachedFeatureDataset(train_dataset, cache)
    audio_seconds = sum(cached.durations)
    logger.info(f"feature cache {cache.dir}: {len(cached):,} clips, {cache.size_bytes() / 2**30:.2f} GiB "
                f"({cache.size_bytes() / max(audio_seconds, 1e-9) / 1e3:.0f} KB per audio second)")
    return cached


def main(argv=None):
    # 1. Arguments; the run then holds output_dir until it ends
    model_args, data_args, training_args = parse_args(sys.argv[1:] if argv is None else argv)
    with hold_output_dir(training_args.output_dir, holder=training_args.should_save):
        return train(model_args, data_args, training_args)


def train(model_args, data_args, training_args):
    # 2. Logging, on the main process only at full volume
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    # our own summaries at INFO on the main process; transformers' chatter only when --log_level asks for it
    level = logging.INFO if training_args.should_log else logging.WARNING
    if training_args.log_level != "passive":
        level = training_args.get_process_log_level()
        transformers.utils.logging.set_verbosity(level)
    for lg in (logger, data.logger):
        lg.setLevel(level)
    transformers.set_seed(training_args.seed)

    # 3. Resume (from a checkpoint of this very config), or refuse to mix runs
    config = SlamASRConfig(model_args.encoder, model_args.llm, model_args.adapter, model_args.downsample,
                           model_args.adapter_hidden, model_args.prompt_template)
    resume = resolve_resume(training_args, config)

    # 4. Model: frozen backbones in half precision when training in it; the adapter stays float32
    dtype = torch.float16 if training_args.fp16 else torch.bfloat16 if training_args.bf16 else None
    with training_args.main_process_first(desc="loading backbones"):  # one download, the others read the cache
        model = SlamASR.from_config(config, torch_dtype=dtype, trust_remote_code=model_args.trust_remote_code)

    # 5. Data
    with training_args.main_process_first(desc="indexing data"):
        if data_args.streaming:
            train_dataset = load_train_stream(data_args, training_args, model.sampling_rate)
        else:
            train_dataset = load_split(data_args, data_args.train_split, data_args.train_manifest,
                                       model.sampling_rate, "train")
        eval_dataset = None
        if training_args.do_eval:
            eval_dataset = load_split(data_args, data_args.eval_split, data_args.eval_manifest, model.sampling_rate,
                                      "eval", data_args.max_eval_samples)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    hours = lambda ds: sum(ds.durations) / 3600 if ds is not None else 0.0  # noqa: E731
    logger.info(f"parameters: {trainable:,} trainable (adapter), {frozen:,} frozen (encoder + LLM)")
    train_summary = (f"streaming {data_args.dataset_name} {data_args.train_split} (decoded and filtered as it "
                     f"arrives)" if data_args.streaming else
                     f"{len(train_dataset):,} clips, {hours(train_dataset):.2f} h")
    logger.info(f"train: {train_summary}"
                + (f"; eval: {len(eval_dataset):,} clips, {hours(eval_dataset):.2f} h" if eval_dataset else ""))

    if data_args.preprocessing_only:
        logger.info("backbones and data are downloaded and indexed; the training launch will read them from the "
                    "cache (--preprocessing_only: exiting before training)")
        return 0
    if data_args.feature_cache:
        train_dataset = fill_feature_cache(model, train_dataset, data_args, training_args)
    collator = data.SpeechCollator(model.processor, data_args.max_target_tokens)

    # 6. Train (the trainer stops on SIGTERM/SIGINT: trainer.stop)
    trainer = SlamASRTrainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=collator,
        wer_dataset=eval_dataset if training_args.predict_with_generate else None,
        max_new_tokens=data_args.max_new_tokens, num_beams=training_args.generation_num_beams or 1,
        max_nonfinite_steps=data_args.max_nonfinite_steps, max_batch_seconds=data_args.max_batch_seconds,
    )
    if not data_args.streaming:
        logger.info(f"train batches: {describe_batches(trainer)}")
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except NonFiniteTraining as e:
        logger.error(str(e))
        return 1
    except StopDuringEvaluation:
        pass  # the step's checkpoint is saved; trainer.stop.received says why, below
    finally:
        trainer.stop.restore()  # the signal handlers, also where train() left before on_train_end
    counts, filtered = trainer.data_counts, trainer.filtered
    if training_args.world_size > 1:  # each rank counted what its own loader skipped
        counts = {k: sum(c[k] for c in gather_object([counts])) for k in counts}
        filtered = sum((Counter(f) for f in gather_object([dict(filtered)])), Counter())
    logger.info(f"data: {counts['skipped']} clips skipped while loading, {counts['truncated']} transcripts "
                f"truncated to {data_args.max_target_tokens} tokens, {counts['nonfinite_steps']} non-finite steps")
    if filtered:
        logger.info("data: the stream's filters dropped " + ", ".join(f"{n} {r}" for r, n in filtered.most_common()))
    if trainer.stop.received:
        logger.warning(f"stopped by {trainer.stop.received} at step {trainer.state.global_step}; checkpoint saved. "
                       f"Resume with the same command plus --resume_from_checkpoint last")
        return 128 + (signal.SIGINT if trainer.stop.received == "SIGINT" else signal.SIGTERM)

    # Trainer counts steps x nominal batch size; duration batches vary in size, so report what was trained on
    result.metrics["train_samples_per_second"] = round(counts["samples"] / result.metrics["train_runtime"], 3)

    # 7. Save the adapter at the top of output_dir, then a final evaluation
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    logger.info(f"adapter saved to {training_args.output_dir} (load it with SlamASR.load_adapter)")
    return 0


if __name__ == "__main__":
    code = main()
    if torch.distributed.is_initialized():
        # leave together: a rank that exits while its peer still holds the gloo/NCCL group can abort
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.exit(code)
