"""
SlamASRTrainer: Hugging Face's Trainer for a model of which only a small adapter trains, on runs that get
preempted. What it changes, and why: checkpoints hold only the adapter (not gigabytes of frozen backbones),
are marked complete last and rotated only after that; training batches can be sized by audio seconds; the
eval WER comes from real generation; a NaN/Inf step is skipped and counted; SIGTERM/SIGINT saves and stops
within a step or an evaluation batch. Then the checkpoint folders themselves: the lock on output_dir, which
checkpoints are complete and intact, and what to resume from.

finetune.py is the recipe that uses it.
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
import time
import zipfile
from dataclasses import fields
from glob import glob

import torch
from accelerate.utils import gather_object
from safetensors import SafetensorError, safe_open
from transformers import Trainer, TrainerCallback
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_pt_utils import BatchRebalanceSampler, LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

import data
from model import CONFIG_NAME, WEIGHTS_NAME, SlamASR, SlamASRConfig
from processor import write_text_atomic

logger = logging.getLogger("finetune")
COMPLETE_MARKER = "checkpoint_complete.json"  # written last: a checkpoint without it is a torn write
LOCK_NAME = ".finetune.lock"  # in output_dir, held by the run writing there


# ----------------------------------------------------------------------------------------------------------
# Stopping on signals, duration batches


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


class NonFiniteTraining(RuntimeError):
    pass


class StopDuringEvaluation(Exception):
    """A stop signal came during an evaluation; the step's checkpoint is saved as it leaves train()."""


# ----------------------------------------------------------------------------------------------------------
# The Trainer


class SlamASRTrainer(Trainer):
    """Trainer with the changes above. The model's generation_config decodes the WER clips (`wer_dataset`);
    `wer_normalizer` names data.WER_NORMALIZERS' normalizer; `efficiency` (efficiency.RunEfficiency) counts each
    training batch's FLOPs and times the evaluations, and its MFU goes into the training logs."""

    def __init__(self, *args, wer_dataset=None, wer_normalizer="whisper", max_nonfinite_steps=25,
                 max_batch_seconds=None, efficiency=None, **kwargs):
        self.max_batch_seconds = max_batch_seconds  # read while Trainer builds its loaders
        self.stop = StopOnSignal()
        super().__init__(*args, callbacks=[*(kwargs.pop("callbacks", None) or []), self.stop], **kwargs)
        self.wer_dataset = wer_dataset
        self.wer_normalizer = wer_normalizer
        self.max_nonfinite_steps = max_nonfinite_steps
        self.efficiency = efficiency
        self.data_stats = data.DataStats()  # this rank's; finetune.py sums the ranks at the end
        self.nonfinite_steps = self.consecutive_nonfinite = 0
        # Trainer rotates checkpoints before our completion marker is written, and by a glob that takes the
        # user's checkpoint-best along (transformers 5.23, in _save_checkpoint and at the end of train()):
        # it gets no limit, and rotate_checkpoints applies ours.
        self.save_total_limit, self.args.save_total_limit = self.args.save_total_limit, None

    # --- loss, data bookkeeping, non-finite steps (public Trainer methods) ----------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        stats = inputs.pop("data_stats")
        if model.training:
            self.data_stats.add(stats)
            if self.efficiency is not None:
                self.efficiency.count_batch(self.accelerator.unwrap_model(model), inputs)
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
        self.nonfinite_steps += 1
        self.consecutive_nonfinite += 1
        logger.warning(f"step {self.state.global_step}: non-finite loss, step skipped "
                       f"({self.nonfinite_steps} so far)")
        if self.consecutive_nonfinite >= self.max_nonfinite_steps:
            raise NonFiniteTraining(
                f"{self.consecutive_nonfinite} consecutive steps had a NaN/Inf loss; stopping. The last checkpoint "
                f"in {self.args.output_dir} is intact. Try a lower --learning_rate, bf16 instead of fp16, or "
                "--strict_data to find a bad clip.")
        return loss

    def log(self, logs, start_time=None):
        if "loss" in logs:  # training logs carry the running data counters (this rank's)
            logs = {**logs, "skipped_clips": self.data_stats.skipped, "nonfinite_steps": self.nonfinite_steps}
            if self.efficiency is not None:  # this rank's steps so far
                flops = self.efficiency.flops()
                logs.update(model_tflops=(flops["encoder_in_steps"] + flops["adapter_llm"]) / 1e12,
                            mfu=self.efficiency.training_mfu())
        super().log(logs, start_time)

    # --- samplers and loaders: transformers 5.23's private _get_train_sampler / _get_eval_sampler -------------

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

    # --- checkpoints: transformers 5.23's private _save, _save_optimizer_and_scheduler, _save_checkpoint,
    # _load_from_checkpoint, _load_best_model. Adapter-only files, marked complete last, rotated after that. ----

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
        timed = self.efficiency.phase("evaluation") if self.efficiency is not None else contextlib.nullcontext()
        with timed:
            return self.evaluate_untimed(eval_dataset, ignore_keys, metric_key_prefix)

    def evaluate_untimed(self, eval_dataset, ignore_keys, metric_key_prefix):
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
        """Transcribes the WER clips (sharded over ranks) with the model's generation_config, writes the
        predictions, returns the WER and its counts."""
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        rank, world = self.args.process_index, self.args.world_size
        rows, failed = [], []
        records = sorted(self.wer_dataset.records[rank::world], key=lambda r: r["duration"], reverse=True)
        batch_size = self.args.per_device_eval_batch_size
        batches = data.clip_batches(records, self.wer_dataset.load, batch_size, "eval WER",
                                    disable=not self.is_world_process_zero())
        # as many batches on every rank (a shorter share ends on empty ones), so that all can agree on a stop
        for _ in range(math.ceil(math.ceil(len(self.wer_dataset.records) / world) / batch_size)):
            if self.stop.requested(self.args):
                raise StopDuringEvaluation(self.stop.received)
            batch, audios, bad = next(batches, ([], [], []))
            failed += [(record["id"], reason) for record, reason in bad]
            if audios:
                hypotheses = model.generate(**model.processor(audios=audios).to(model.device))
                rows += [dict(id=r["id"], reference=r["text"], hypothesis=h) for r, h in zip(batch, hypotheses)]
        model.train(was_training)
        rows = gather_object(rows) if world > 1 else rows
        failed = gather_object(failed) if world > 1 else failed
        scores = data.word_error_rate([r["reference"] for r in rows], [r["hypothesis"] for r in rows],
                                      self.wer_normalizer)
        if self.args.should_save:
            path = os.path.join(self.args.output_dir, f"predictions_step{self.state.global_step}.jsonl")
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                for row in sorted(rows, key=lambda r: r["id"]):
                    f.write(json.dumps(row) + "\n")
            if failed:
                logger.warning(f"eval WER: {len(failed)} clips could not be read and were left out, e.g. {failed[0]}")
        beams = model.generation_config.num_beams
        logger.info(f"eval {data.wer_line(scores, data.decoding_name(beams))}; "
                    f"{len(rows)} clips")
        return {"wer": scores["wer"], "wer_substitutions": scores["substitutions"],
                "wer_deletions": scores["deletions"], "wer_insertions": scores["insertions"], "wer_num_beams": beams}


# ----------------------------------------------------------------------------------------------------------
# Checkpoint folders: the lock on output_dir, complete and intact checkpoints, what to resume from


def checkpoint_is_complete(path):
    return os.path.isfile(os.path.join(path, COMPLETE_MARKER))


def mark_complete(path, global_step):
    write_text_atomic(os.path.join(path, COMPLETE_MARKER), json.dumps({"global_step": global_step}))


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


