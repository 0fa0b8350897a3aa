"""The one inference loop (inference.py): input order, length batches, per-input errors, results as they come,
long inputs in windows."""
import numpy as np
import pytest

import inference
from audio import DataError, quiet_cuts


def clips_of(audios):
    return [inference.Clip(len(a) / 16000, lambda a=a: a) for a in audios]


def spy_batches(model, monkeypatch):
    """The clip lengths (samples) of every batch model.generate gets."""
    batches, generate = [], model.generate

    def spied(**batch):
        batches.append(batch["audio_lengths"].tolist())
        return generate(**batch)

    monkeypatch.setattr(model, "generate", spied)
    return batches


def test_results_come_in_input_order_from_batches_of_similar_length(trained_model, train_clips, monkeypatch):
    audios, texts = train_clips
    batches = spy_batches(trained_model, monkeypatch)
    with trained_model.decoding(max_new_tokens=12):
        results = inference.transcribe(trained_model, clips_of(audios[:4]), batch_size=2)
    assert [r.text for r in results] == texts[:4]  # the four clips the adapter learnt, in their own order
    assert all(r.error is None and r.cuts == () for r in results)
    lengths = sorted((len(a) for a in audios[:4]), reverse=True)
    assert batches == [lengths[:2], lengths[2:]]  # longest first, neighbours together


def test_an_unreadable_input_is_its_own_error_and_the_rest_go_on(trained_model, train_clips):
    audios, texts = train_clips

    def unreadable():
        raise DataError("broken.flac: cannot read audio (truncated)")

    clips = [clips_of(audios[:1])[0], inference.Clip(2.0, unreadable), inference.Clip(error="known before reading"),
             clips_of(audios[1:2])[0]]
    done = []
    with trained_model.decoding(max_new_tokens=12):
        results = inference.transcribe(trained_model, clips, batch_size=4,
                                       on_result=lambda i, t: done.append((i, t)))
    assert [r.text for r in results] == [texts[0], None, None, texts[1]]
    assert results[1].error.startswith("broken.flac") and results[2].error == "known before reading"
    assert [i for i, _ in done][:1] == [2]  # what is known bad is reported first, before any batch
    assert sorted(i for i, _ in done) == [0, 1, 2, 3] and all(t is results[i] for i, t in done)


def test_each_result_is_handed_over_as_its_batch_finishes(trained_model, train_clips):
    audios, _ = train_clips
    seen_before_batch = []
    done = []
    inference.transcribe(trained_model, clips_of(audios[:4]), batch_size=2, on_result=lambda i, t: done.append(i),
                         before_batch=lambda: seen_before_batch.append(len(done)))
    assert seen_before_batch == [0, 2]  # the first batch's two results were out before the second batch began


def test_before_batch_can_stop_the_loop(trained_model, train_clips):
    audios, _ = train_clips

    class Stop(Exception):
        pass

    def stop():
        raise Stop

    with pytest.raises(Stop):
        inference.transcribe(trained_model, clips_of(audios[:2]), before_batch=stop)


def test_a_long_input_is_its_windows_joined(trained_model, train_clips, monkeypatch):
    audios, _ = train_clips
    gap = np.zeros(8000, np.float32)  # half a second of digital silence between two clips: where the cut goes
    long = np.concatenate([audios[0], gap, audios[1]])
    chunk = (max(len(audios[0]), len(audios[1])) + len(gap)) / 16000  # either clip and the gap fit one window
    windows = [long[start:end] for start, end in quiet_cuts(long, 16000, chunk)]
    with trained_model.decoding(max_new_tokens=12):
        batches = spy_batches(trained_model, monkeypatch)
        [result] = inference.transcribe(trained_model, clips_of([long]), chunk_seconds=chunk)
        monkeypatch.undo()
        alone = trained_model.transcribe(windows, chunk_seconds=None)
    assert len(windows) == 2 and len(result.cuts) == 1
    assert len(audios[0]) / 16000 < result.cuts[0] < (len(audios[0]) + len(gap)) / 16000  # in the silence
    assert result.text == " ".join(alone)
    assert sorted(sum(batches, [])) == sorted(map(len, windows))  # decoded as clips of their own
