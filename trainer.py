"""
SlamASRTrainer: Hugging Face's Trainer for a model of which only a small adapter trains, on runs that get
preempted. What it changes, and why: checkpoints hold only the adapter (not gigabytes of frozen backbones) and
count only once marked complete (checkpoints.py); training batches can be sized by audio seconds; the eval WER
comes from real generation (inference.py); a NaN/Inf step is skipped and counted; SIGTERM/SIGINT saves and stops
within a step or an evaluation batch. finetune.py is the recipe that uses it.

Where a public hook does the job (save_model, compute_loss, training_step, log, evaluate, callbacks), it is used;
the private methods still overridden are listed in PRIVATE_OVERRIDES, and a test fails, naming the method, when
the installed transformers changes one of their signatures.
"""

import contextlib
import json
import logging
import math
import os
import signal
from functools import partial

import torch
from accelerate.utils import gather_object
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

import inference
from audio import DataError
from batching import DataStats, DurationBatchSampler
from checkpoints import clear_stale_checkpoint, mark_complete, rotate_checkpoints
from dataset import StreamingSpeechDataset
from decoding import decoding_name
from model import SlamASR
from text import scores_by_language, wer_line, word_error_rate

logger = logging.getLogger("finetune")


# ----------------------------------------------------------------------------------------------------------
# Stopping on signals, marking checkpoints complete


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


class CompleteCheckpoints(TrainerCallback):
    """Once every rank has written its part of a checkpoint (adapter, optimizer, scheduler, RNG, trainer state),
    the completion marker goes in last, and only then are old checkpoints rotated out: a kill at any point
    leaves something to resume from (checkpoints.py). Trainer's own rotation is off (save_total_limit None)."""

    def __init__(self, save_total_limit):
        self.save_total_limit = save_total_limit

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank's RNG state is on disk before the marker
        if args.should_save:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            mark_complete(path, state.global_step)
            rotate_checkpoints(args.output_dir, self.save_total_limit, keep=path, best=state.best_model_checkpoint)


class EvaluateOnResume(TrainerCallback):
    """A run stopped while evaluating a step (its checkpoint written first) evaluates that step when it resumes,
    before training on: Trainer's own eval_on_start, asked for only then."""

    def on_train_begin(self, args, state, control, **kwargs):
        evaluated = {entry.get("step") for entry in state.log_history if any(k.startswith("eval_") for k in entry)}
        args.eval_on_start = bool(state.global_step and args.eval_strategy == "steps" and state.eval_steps
                                  and state.global_step % state.eval_steps == 0
                                  and state.global_step not in evaluated)


class NonFiniteTraining(RuntimeError):
    pass


class StopDuringEvaluation(Exception):
    """A stop signal came during an evaluation; the step's checkpoint is saved as it leaves train()."""


# ----------------------------------------------------------------------------------------------------------
# The Trainer


class SlamASRTrainer(Trainer):
    """Trainer with the changes above. The model's decoding options decode the WER clips (`wer_dataset`);
    `wer_normalizer` names text.WER_NORMALIZERS' normalizer; `efficiency` (efficiency.RunEfficiency) counts each
    training step's FLOPs and times the evaluations, and its MFU goes into the training logs."""

    def __init__(self, model, args, *, wer_dataset=None, wer_normalizer="auto", max_nonfinite_steps=25,
                 max_batch_seconds=None, efficiency=None, callbacks=None, **kwargs):
        self.max_batch_seconds = max_batch_seconds  # read while Trainer builds its loaders
        self.stop = StopOnSignal()
        # Trainer rotates checkpoints before our completion marker is written, and by a glob that takes the
        # user's checkpoint-best along: it gets no limit, and CompleteCheckpoints applies ours.
        complete = CompleteCheckpoints(args.save_total_limit)
        args.save_total_limit = None
        super().__init__(model=model, args=args, callbacks=[*(callbacks or []), self.stop, complete,
                                                             EvaluateOnResume()], **kwargs)
        self.wer_dataset = wer_dataset
        self.wer_normalizer = wer_normalizer
        self.max_nonfinite_steps = max_nonfinite_steps
        self.efficiency = efficiency
        self.data_stats = DataStats()  # this rank's; finetune.py sums the ranks at the end
        self.nonfinite_steps = self.consecutive_nonfinite = 0
        self.saved_step = None  # the step of the checkpoint written last
        self.last_evaluation = None  # (step, metrics)

    # --- loss, data bookkeeping, non-finite steps ------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training and self.efficiency is not None:
            self.efficiency.count_step(outputs)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.data_stats.add(inputs.stats)  # the collator's SpeechBatch, before Trainer copies it to a plain dict
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

    # --- loaders and samplers --------------------------------------------------------------------------------

    def get_train_dataloader(self):
        if not isinstance(self.train_dataset, StreamingSpeechDataset):
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

    # --- checkpoints: adapter-only files, marked complete last (CompleteCheckpoints) -------------------------

    def save_model(self, output_dir=None, _internal_call=False):
        output_dir = output_dir or self.args.output_dir
        adapter = self.accelerator.unwrap_model(self.model).adapter
        if not all(torch.isfinite(p).all() for p in adapter.parameters()):
            raise NonFiniteTraining(f"the adapter's weights hold NaN/Inf at step {self.state.global_step}: nothing "
                                    f"saved to {output_dir} (training diverged; the last checkpoint is intact). Try a "
                                    "lower --learning_rate.")
        if _internal_call:  # the first write of a checkpoint (Trainer._save_checkpoint)
            self.saved_step = self.state.global_step
            clear_stale_checkpoint(output_dir, self.args.should_save)
            self.accelerator.wait_for_everyone()  # gone before any rank writes into it
            if self.efficiency is not None:  # what the run cost so far, for a resume to go on counting from
                os.makedirs(output_dir, exist_ok=True)
                self.efficiency.save(output_dir, self.args.process_index)
        if self.args.should_save:
            self.accelerator.unwrap_model(self.model).save_adapter(output_dir)

    def _save_optimizer_and_scheduler(self, output_dir):
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        from accelerate.utils import DeepSpeedSchedulerWrapper
        from transformers.trainer import SCHEDULER_NAME

        # The engine's checkpoint would also hold the frozen backbones (gigabytes); Trainer leaves them out only
        # for PEFT models, so say it here. The scheduler is Trainer's own unless the DeepSpeed config names one.
        self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def load_adapter_weights(self, directory):
        model = self.accelerator.unwrap_model(self.model)
        loaded = SlamASR.load_adapter(directory, model.encoder, model.llm, model.tokenizer, model.feature_extractor)
        model.adapter.load_state_dict(loaded.adapter.state_dict(), strict=True)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        self.load_adapter_weights(resume_from_checkpoint)

    def _load_best_model(self):
        self.load_adapter_weights(self.state.best_model_checkpoint)

    # --- evaluation: loss from Trainer, WER from real generation ---------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        if self.is_in_train and self.control.should_save:
            # Trainer saves after evaluating: a checkpoint due at this step is written first, so that an evaluation
            # that fails (out of memory in generation, say) or is stopped cannot lose the steps since the last one
            self.save_checkpoint_now()
            self.control.should_save = False
        timed = self.efficiency.phase("evaluation") if self.efficiency is not None else contextlib.nullcontext()
        try:
            with timed:
                try:
                    metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
                except DataError as e:  # every eval clip bad: the WER below reports them one by one
                    logger.warning(f"eval loss left out: {e}")
                    metrics = {}
                if self.wer_dataset is not None:
                    wer = {f"{metric_key_prefix}_{k}": v for k, v in self.generate_and_score().items()}
                    self.log(wer)
                    metrics.update(wer)
        except StopDuringEvaluation:
            # save now, on every rank (they agreed to stop at this batch), then leave train()
            if self.is_in_train and self.saved_step != self.state.global_step:
                self.save_checkpoint_now()
            raise
        self.last_evaluation = (self.state.global_step, metrics)
        return metrics

    def save_checkpoint_now(self):
        self._save_checkpoint(self.model, trial=None)
        self.control = self.callback_handler.on_save(self.args, self.state, self.control)

    def generate_and_score(self):
        """Transcribes the WER clips (sharded over ranks) with the model's decoding options, writes the
        predictions, returns the WER and its counts."""
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        rank, world, batch_size = self.args.process_index, self.args.world_size, self.args.per_device_eval_batch_size
        records = self.wer_dataset.records[rank::world]
        rounds = 0

        def before_batch():
            nonlocal rounds
            rounds += 1
            if self.stop.requested(self.args):
                raise StopDuringEvaluation(self.stop.received)

        clips = [inference.Clip(r.duration, partial(self.wer_dataset.load, r), language=r.language) for r in records]
        results = inference.transcribe(model, clips, batch_size, before_batch=before_batch, desc="eval WER",
                                       disable_progress=not self.is_world_process_zero())
        # as many stop checks on every rank (a shorter share ends first), so that all can agree on a stop
        for _ in range(rounds, math.ceil(math.ceil(len(self.wer_dataset.records) / world) / batch_size)):
            before_batch()
        model.train(was_training)
        rows = [dict(id=r.id, reference=r.text, hypothesis=t.text, language=r.language or model.config.language)
                for r, t in zip(records, results) if t.error is None]
        failed = [(r.id, t.error) for r, t in zip(records, results) if t.error is not None]
        rows = gather_object(rows) if world > 1 else rows
        failed = gather_object(failed) if world > 1 else failed
        if failed:
            logger.warning(f"eval WER: {len(failed)} clips could not be read and were left out, e.g. {failed[0]}")
        beams = model.generation_config.num_beams
        if not rows:  # NaN, not 0%: no clip was scored (and Trainer's best-model tracking takes NaN)
            logger.warning("eval WER: no clip could be read; WER not measured at this step")
            return {"wer": float("nan"), "wer_unreadable_clips": len(failed), "wer_num_beams": beams}
        references, hypotheses, languages = ([r[key] for r in rows] for key in ("reference", "hypothesis", "language"))
        scores = word_error_rate(references, hypotheses, self.wer_normalizer, languages)
        if self.args.should_save:
            path = os.path.join(self.args.output_dir, f"predictions_step{self.state.global_step}.jsonl")
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                for row in sorted(rows, key=lambda r: r["id"]):  # a language only where the clip has one
                    f.write(json.dumps({k: v for k, v in row.items() if k != "language" or v is not None}) + "\n")
        logger.info(f"eval {wer_line(scores, decoding_name(beams))}; {len(rows)} clips")
        by_language = scores_by_language(references, hypotheses, languages, self.wer_normalizer)
        if len(by_language) > 1:  # a figure per language too: one language's errors can hide in the total
            for language, own in by_language.items():
                logger.info(f"eval {language}: {wer_line(own, decoding_name(beams))}")
        return {"wer": scores["wer"], "wer_substitutions": scores["substitutions"],
                "wer_deletions": scores["deletions"], "wer_insertions": scores["insertions"],
                "wer_unreadable_clips": len(failed), "wer_num_beams": beams,
                **({f"wer_{language}": own["wer"] for language, own in by_language.items()}
                   if len(by_language) > 1 else {})}


# The private Trainer methods overridden above, with the parameters they have in the transformers this was
# written against (5.23-5.24); tests/test_trainer.py compares them with the installed version.
PRIVATE_OVERRIDES = {
    "_get_train_sampler": ("self", "train_dataset"),
    "_get_eval_sampler": ("self", "eval_dataset"),
    "_save_optimizer_and_scheduler": ("self", "output_dir"),
    "_load_from_checkpoint": ("self", "resume_from_checkpoint", "model"),
    "_load_best_model": ("self",),
}
