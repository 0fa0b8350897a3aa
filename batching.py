"""
Batches: which clips go together (packed by duration, so that padding stays small), and samples to the
tensors SlamASR.forward takes (the collator, a thin call of the processor). A batch's keys are exactly
forward's arguments; what the data did to make it (clips skipped, transcripts truncated) rides beside them as
`batch.stats`, which the trainer counts.
"""

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import BatchFeature
from transformers.trainer_pt_utils import BatchRebalanceSampler

# ----------------------------------------------------------------------------------------------------------
# Packing


def fill_batches(durations, max_clips, max_seconds=None, max_padding=None, order=None):
    """Index batches of consecutive clips in `order` (by default `durations`' own, which should then be ascending):
    at most `max_clips` clips and `max_seconds` padded seconds (longest x clips) each; with `max_padding` (a
    fraction), only clips within that fraction of the batch's longest. An encoder without an attention mask
    (group-norm HuBERT-base) then sees at most that much zero padding, as it was pretrained on; 0 batches only
    clips of equal length."""
    batches, current, longest, shortest = [], [], 0.0, 0.0
    for i in range(len(durations)) if order is None else order:
        seconds = durations[i]
        if current:
            with_this, n = max(longest, seconds), len(current) + 1
            if (n > max_clips or (max_seconds is not None and with_this * n > max_seconds)
                    or (max_padding is not None and min(shortest, seconds) < (1 - max_padding) * with_this)):
                batches.append(current)
                current = []
        if not current:
            longest = shortest = seconds
        current.append(i)
        longest, shortest = max(longest, seconds), min(shortest, seconds)
    if current:
        batches.append(current)
    return batches


def duration_batches(durations, max_batch_seconds, seed=0, jitter=0.0):
    """Index batches whose padded audio (longest clip x clips) stays within max_batch_seconds: clips sorted by
    duration, neighbours batched together, the batches shuffled. `jitter` (seconds) perturbs the sort keys so
    that each seed (epoch) batches other neighbours together, at a small cost in padding."""
    rng = np.random.default_rng(seed)
    keys = np.asarray(durations, dtype=np.float64)
    if jitter:
        keys = keys + rng.uniform(-jitter, jitter, len(keys))
    batches = fill_batches(durations, len(durations), max_batch_seconds,
                           order=np.argsort(keys, kind="stable").tolist())
    rng.shuffle(batches)
    return batches


def padding_fraction(durations, batches):
    """The share of the padded audio (longest clip x clips, per batch) that is padding."""
    padded = sum(max(durations[i] for i in b) * len(b) for b in batches)
    return 1 - sum(durations[i] for b in batches for i in b) / padded


class DurationBatchSampler(BatchRebalanceSampler):
    """This rank's share of `duration_batches`, batched anew each epoch. Trainer gives a BatchRebalanceSampler
    to the DataLoader as its batch sampler and keeps accelerate from splitting it over ranks again, which is
    what a rank-aware sampler of variable-size batches needs; the parent's fixed-size balancing is not used, so
    its __init__ is not called."""

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
        return duration_batches(self.durations, self.max_batch_seconds, self.seed + epoch, jitter=self.JITTER_SECONDS)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.batches_per_rank

    def __iter__(self):
        batches = self.all_batches(self.epoch)
        needed = self.batches_per_rank * self.world
        batches = (batches * (needed // len(batches) + 1))[:needed]  # cut (or wrap) to an equal share per rank
        return iter(batches[self.rank::self.world])


# ----------------------------------------------------------------------------------------------------------
# Collating


@dataclass
class BatchStats:
    """What the data did to make one batch: its clips, the bad clips they replaced, transcripts cut to
    max_target_tokens, and (a stream's) clips its filter dropped on the way, per reason."""

    samples: int = 0
    skipped: list = field(default_factory=list)
    truncated: int = 0
    filtered: dict = field(default_factory=dict)


class SpeechBatch(BatchFeature):
    """The processor's batch, whose keys are exactly SlamASR.forward's arguments (so `model(**batch)` works), and
    `stats` (BatchStats) as an attribute: it survives DataLoader workers and device moves, never reaches forward."""

    stats = None

    def __getstate__(self):  # BatchFeature pickles its data alone: DataLoader workers would drop the stats
        return {**super().__getstate__(), "stats": self.stats}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.stats = state.get("stats")


def collate_frames(samples):
    """Cached encoder frames -> (encoder_frames (B, T, D) zero-padded, frame_lengths (B,))."""
    lengths = torch.tensor([len(s.frames) for s in samples])
    frames = torch.zeros(len(samples), int(lengths.max()), samples[0].frames.shape[1], dtype=samples[0].frames.dtype)
    for i, s in enumerate(samples):
        frames[i, : len(s.frames)] = s.frames
    return frames, lengths


class SpeechCollator:
    """Samples (dataset.Sample) -> SpeechBatch: input_values (or Whisper's input_features) and audio_lengths, or
    cached encoder_frames and frame_lengths; labels; each clip's prompt ids where the clips' languages differ
    from the reference prompt's (prompt_prefix, prompt_suffix). Made by the processor (processor.SlamASRProcessor)."""

    def __init__(self, processor, max_target_tokens=None):
        self.processor = processor
        self.max_target_tokens = max_target_tokens

    def __call__(self, samples):
        batch = SpeechBatch()
        if samples[0].frames is not None:  # from the feature cache
            batch["encoder_frames"], batch["frame_lengths"] = collate_frames(samples)
        else:
            batch.update(self.processor(audios=[s.audio for s in samples]))
        languages = [s.language for s in samples]
        batch["labels"], truncated = self.processor.labels([s.text for s in samples], self.max_target_tokens,
                                                           languages)
        batch.update(self.processor.prompt_rows(languages))  # each clip's prompt, where not all are the reference
        filtered = Counter()
        for s in samples:  # only a stream filters while batching; indexed data is filtered up front
            filtered.update(s.filtered)
        batch.stats = BatchStats(len(samples), [item for s in samples for item in s.skipped], truncated, dict(filtered))
        return batch


class DataStats:
    """What the data did over a run, summed from each batch's BatchStats: clips trained on, skipped while loading
    (replaced by the next good one), dropped by a stream's filters, transcripts truncated. Each rank counts what
    its own loader (its workers included) made; `summed` adds the ranks up."""

    def __init__(self):
        self.samples, self.skipped, self.truncated, self.filtered = 0, 0, 0, Counter()

    def add(self, stats):
        self.samples += stats.samples
        self.skipped += len(stats.skipped)
        self.truncated += stats.truncated
        self.filtered.update(stats.filtered)

    def summed(self, world_size):
        """These counts over all ranks (a collective: every rank calls it)."""
        if world_size == 1:
            return self
        from accelerate.utils import gather_object

        total = DataStats()
        for rank in gather_object([vars(self)]):
            total.samples += rank["samples"]
            total.skipped += rank["skipped"]
            total.truncated += rank["truncated"]
            total.filtered.update(rank["filtered"])
        return total

    def summary(self, max_target_tokens):
        line = (f"data: {self.skipped} clips skipped while loading, {self.truncated} transcripts truncated to "
                f"{max_target_tokens} tokens")
        if self.filtered:
            line += "; the stream's filters dropped " + ", ".join(f"{n} {r}" for r, n in self.filtered.most_common())
        return line
