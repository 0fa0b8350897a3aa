"""Packing and collating (batching.py)."""

import numpy as np
import pytest
import torch
from conftest import make_model, tiny_processor

from backbones import tiny_backbones
from batching import BatchStats, SpeechCollator, duration_batches, padding_fraction
from dataset import Sample


def test_odd_characters_tokenize_and_train():
    collator = SpeechCollator(tiny_processor())
    batch = collator([Sample("x", "café ✓ 日本 ½", audio=np.ones(4000, np.float32))])
    assert (batch["labels"] != -100).sum() > 5


def test_collator_shapes_and_masks(clip):
    _, _, tokenizer, fe = tiny_backbones()
    samples = [Sample("a", "the ship", audio=clip[:8000], skipped=[("x", "bad")]),
               Sample("b", "she opened the old book", audio=clip)]
    short = tokenizer("the ship", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    batch = SpeechCollator(tiny_processor(), max_target_tokens=len(short))(samples)
    assert batch["input_values"].shape == (2, len(clip))
    assert batch["audio_lengths"].tolist() == [8000, len(clip)]
    assert (batch["input_values"][0, 8000:] == 0).all()
    assert batch["labels"][0].tolist() == short  # fits exactly: not truncated
    assert batch["labels"].shape[1] == len(short)
    assert batch["labels"][1, -1] == tokenizer.eos_token_id  # truncated, EOS kept
    assert batch.stats == BatchStats(samples=2, skipped=[("x", "bad")], truncated=1, filtered={})
    assert set(batch) == {"input_values", "audio_lengths", "labels"}  # exactly what forward takes
    assert torch.isfinite(batch["input_values"]).all()


def test_duration_batches_and_same_summed_loss(train_set):
    durations = train_set.durations
    batches = duration_batches(durations, max_batch_seconds=6.0, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(len(durations)))
    for b in batches:
        assert len(b) == 1 or max(durations[i] for i in b) * len(b) <= 6.0
    rng = np.random.default_rng(0)
    random_batches = np.array_split(rng.permutation(len(durations)), len(batches))
    assert padding_fraction(durations, batches) <= padding_fraction(durations, random_batches)
    model = make_model()
    collator = SpeechCollator(model.processor)

    def summed(bs):
        total = 0.0
        for b in bs:
            batch = collator([train_set[int(i)] for i in b])
            with torch.no_grad():
                out = model(batch["input_values"], batch["audio_lengths"], batch["labels"])
            total += (out.loss * out.num_tokens).item()
        return total

    assert summed(batches) == pytest.approx(summed(random_batches), rel=1e-4)


def test_duration_batch_sampler_gives_ranks_equal_disjoint_shares():
    from finetune import DurationBatchSampler
    rng = np.random.default_rng(0)
    durations = list(2 + 18 * rng.beta(3.0, 2.4, size=600))  # LibriSpeech-like, as in bench.py
    ranks = [DurationBatchSampler(durations, 120.0, rank, 2, seed=5) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    epochs = []
    for epoch in range(3):
        for sampler in ranks:
            sampler.set_epoch(epoch)
        shares = [list(sampler) for sampler in ranks]
        assert [len(s) for s in shares] == [len(ranks[0])] * 2  # same step count on both ranks, every epoch
        clips = [i for share in shares for b in share for i in b]
        assert len(clips) == len(set(clips))  # no clip twice in an epoch (batches are cut, not wrapped, here)
        assert len(clips) > 0.95 * len(durations)
        for b in shares[0] + shares[1]:
            assert max(durations[i] for i in b) * len(b) <= 120.0
        epochs.append({tuple(sorted(b)) for share in shares for b in share})
        random_batches = np.array_split(rng.permutation(len(durations)), len(shares[0]) * 2)
        assert padding_fraction(durations, shares[0] + shares[1]) < 0.05 < padding_fraction(
            durations, random_batches)
    assert len(epochs[0] & epochs[1]) < 0.5 * len(epochs[0])  # other neighbours share batches each epoch


def test_a_collated_batch_is_exactly_what_forward_takes(train_set):
    model = make_model()
    samples = [train_set[i] for i in range(3)]
    batch = SpeechCollator(model.processor)(samples)
    assert torch.isfinite(model(**batch).loss)  # no side channel to pop first
    assert batch.stats.samples == 3
