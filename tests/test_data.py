import itertools
import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import FIXTURE, hub_dataset, hub_rows, returns_within, tiny_processor

import data
from backbones import tiny_backbones

CLIP = FIXTURE / "test-clean" / "3001" / "4001" / "3001-4001-0000.flac"


@pytest.fixture(scope="module")
def clip():
    audio, rate = sf.read(CLIP, dtype="float32")
    assert rate == data.SAMPLE_RATE
    return audio


# --- sources ------------------------------------------------------------------------------------------------

def test_librispeech_folder():
    report = data.DataReport("t")
    records = data.index_librispeech(FIXTURE, "test-clean,dev-clean", report)
    assert len(records) == 8 and not report.counts
    first = records[0]
    assert first["id"] == "3001-4001-0000" and first["text"] == "THE WIND BLEW ALL NIGHT"
    dataset = data.build_dataset("t", records, report)
    sample = dataset[0]
    assert sample["text"] == "the wind blew all night" and sample["skipped"] == []
    assert abs(dataset.durations[0] - len(sample["audio"]) / data.SAMPLE_RATE) < 1e-3
    with pytest.raises(FileNotFoundError, match="train-other-500"):
        data.index_librispeech(FIXTURE, "train-other-500", report)


def test_hub_schema_built_locally(clip):
    rows = hub_rows("dev-clean")
    report = data.DataReport("hub")
    records, hub = data.records_from_hub(hub_dataset(rows), report)
    assert [r["id"] for r in records] == [r["id"] for r in rows]
    dataset = data.build_dataset("hub", records, report, hub_dataset=hub)
    audio, _ = sf.read(rows[2]["file"], dtype="float32")
    np.testing.assert_array_equal(dataset[2]["audio"], audio)
    assert dataset[2]["text"] == rows[2]["text"].lower()


def test_hub_rows_are_known_by_dataset_and_row():
    rows = hub_rows("dev-clean")
    identities = lambda rows: [r["audio_identity"] for r in data.records_from_hub(  # noqa: E731
        hub_dataset(rows), data.DataReport("hub"))[0]]
    first = identities(rows)
    assert len(set(first)) == len(rows)
    assert identities(rows) == first  # the same data, indexed again (the next run), finds its cache entries
    assert identities(rows[::-1])[0] != first[0]  # other audio in row 0: another entry


@pytest.mark.parametrize("world", [2, 3])  # 4 shards: split by shard over 2 ranks, by clip over 3
def test_stream_splits_over_ranks_and_restarts_reshuffled(world):
    rows = hub_rows("train-clean-100")
    stream = hub_dataset(rows).to_iterable_dataset(num_shards=4)  # (finetune tests stream parquet shards)
    every = [r["id"] for r in rows]
    passes = []
    for rank in range(world):
        part = data.StreamingSpeechDataset(stream, rank, world, seed=3, shuffle_buffer=4)
        n = len(every[rank::world])
        ids = [s["id"] for s in itertools.islice(part, 3 * n)]  # three passes over this rank's part
        passes.append([ids[:n], ids[n:2 * n], ids[2 * n:]])
    for n in range(3):  # in every pass the ranks together cover the split once, without overlap
        assert sorted(sum((p[n] for p in passes), [])) == sorted(every)
    assert any(p[0] != p[1] or p[1] != p[2] for p in passes)  # each pass shuffled anew
    sample = next(iter(data.StreamingSpeechDataset(stream, shuffle_buffer=0)))
    audio, _ = sf.read(rows[0]["file"], dtype="float32")
    np.testing.assert_array_equal(sample["audio"], audio)
    assert sample["id"] == rows[0]["id"] and sample["text"] == rows[0]["text"].lower()


def test_stream_skips_bad_clips_and_counts_what_it_filters(clip):
    rows = hub_rows("dev-clean")
    rows[1]["audio"] = {"bytes": b"not audio at all", "path": "broken.flac"}
    rows[2]["text"] = "  "
    stream = hub_dataset(rows).to_iterable_dataset(num_shards=2)
    samples = list(itertools.islice(data.StreamingSpeechDataset(stream, shuffle_buffer=0), 2))
    assert [s["id"] for s in samples] == [rows[0]["id"], rows[3]["id"]]
    assert samples[0]["skipped"] == [] and samples[0]["filtered"] == {}
    assert [i for i, _ in samples[1]["skipped"]] == [rows[1]["id"]]
    assert samples[1]["filtered"] == {"empty transcript": 1}
    stats = data.SpeechCollator(tiny_processor())(samples)["data_stats"]  # what the trainer counts
    assert stats["filtered"] == {"empty transcript": 1} and len(stats["skipped"]) == 1
    with pytest.raises(data.DataError, match="cannot read audio.*strict_data"):
        list(itertools.islice(data.StreamingSpeechDataset(stream, shuffle_buffer=0, strict_data=True), 2))
    with pytest.raises(data.DataError, match="no usable clip"):
        next(iter(data.StreamingSpeechDataset(stream, shuffle_buffer=0, max_duration=0.1)))


def test_manifest_and_malformed_lines(tmp_path, clip):
    sf.write(tmp_path / "a.wav", clip, 16000)
    lines = [json.dumps({"audio": "a.wav", "text": "Hello  World"}), "{not json", json.dumps({"text": "no audio"}),
             json.dumps({"audio": "a.wav", "text": 5}), "", json.dumps({"audio": "a.wav", "text": "x", "id": "u2"})]
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    report = data.DataReport("m")
    records = data.read_manifest(tmp_path / "m.jsonl", report)
    assert [r["id"] for r in records] == ["a.wav", "u2"]
    assert report.counts == {"manifest line is not JSON": 1, 'manifest line lacks a string "audio" or "text"': 2}
    assert data.build_dataset("m", records, report)[0]["text"] == "hello world"


def test_manifest_duration_is_checked_against_the_header(tmp_path, clip):
    sf.write(tmp_path / "a.wav", clip, 16000)
    sf.write(tmp_path / "long.wav", np.zeros(40 * 16000, np.int16), 16000)
    seconds = len(clip) / 16000
    listed = [("long.wav", 2.0), ("a.wav", float("nan")), ("a.wav", -1.0), ("a.wav", "3"), ("a.wav", seconds + 0.2),
              ("long.wav", None)]
    lines = [json.dumps({"audio": a, "text": "x", "id": str(i), **({} if d is None else {"duration": d})})
             for i, (a, d) in enumerate(listed)]
    (tmp_path / "m.jsonl").write_text("\n".join(lines))  # json writes the float NaN as NaN, and reads it back
    report = data.DataReport("m")
    dataset = data.build_dataset("m", data.read_manifest(tmp_path / "m.jsonl", report), report, max_duration=30.0)
    assert [r["id"] for r in dataset.records] == ["4"]
    assert dataset.durations == [pytest.approx(seconds)]  # the header's, not the listed one
    assert report.counts == {'manifest "duration" is not a finite number >= 0': 3,
                             "manifest duration differs from the audio header by more than 0.5 s": 1,
                             "longer than --max_duration 30 s": 1}
    assert "listed 2 s, header 40.00 s" in report.examples["manifest duration differs from the audio header by "
                                                           "more than 0.5 s"][0]


def test_duplicate_ids_are_dropped_and_counted(tmp_path, clip):
    sf.write(tmp_path / "a.wav", clip, 16000)
    sf.write(tmp_path / "b.wav", clip[:16000], 16000)
    lines = [{"audio": "a.wav", "text": "first", "id": "u1"}, {"audio": "b.wav", "text": "second", "id": "u1"},
             {"audio": "b.wav", "text": "third", "id": "u2"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    report = data.DataReport("m")
    dataset = data.build_dataset("m", data.read_manifest(tmp_path / "m.jsonl", report), report)
    assert [(r["id"], r["text"]) for r in dataset.records] == [("u1", "first"), ("u2", "third")]
    assert report.counts == {"duplicate id": 1}


# --- audio --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
@pytest.mark.parametrize("subtype", ["PCM_16", "DOUBLE"])
def test_resampling_and_stereo(tmp_path, clip, rate, subtype):
    import soxr
    resampled = soxr.resample(clip, 16000, rate)
    stereo = np.stack([resampled, 0.5 * resampled], axis=1)
    sf.write(tmp_path / "s.wav", stereo, rate, subtype=subtype)
    audio = data.read_audio(str(tmp_path / "s.wav"))
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - len(clip)) <= 2
    n = min(len(audio), len(clip))
    target = 0.75 * clip[:n]  # the mean of the two channels
    if rate >= 16000:  # 8 kHz loses the upper band; the rest must match closely
        assert np.corrcoef(audio[:n], target)[0, 1] > 0.99
    assert abs(data.audio_duration(str(tmp_path / "s.wav")) - len(clip) / 16000) < 1e-3


@pytest.mark.parametrize("make, reason", [
    (lambda p: None, "missing audio file"),
    (lambda p: p.write_bytes(CLIP.read_bytes()[:300]), "cannot read"),  # truncated flac
    (lambda p: p.write_text("this is not audio"), "cannot read"),
    (lambda p: sf.write(p, np.zeros(0, np.float32), 16000, format="WAV"), "too short"),
    (lambda p: sf.write(p, np.zeros(200, np.float32), 16000, format="WAV"), "too short"),
    (lambda p: sf.write(p, np.array([0.1, np.nan] * 4000, np.float32), 16000, format="WAV", subtype="FLOAT"),
     "NaN or Inf"),
    (lambda p: sf.write(p, np.array([0.1, -np.inf] * 4000, np.float32), 16000, format="WAV", subtype="FLOAT"),
     "NaN or Inf"),
])
def test_bad_audio_is_a_clear_error(tmp_path, make, reason):
    path = tmp_path / "bad.flac"
    make(path)
    with pytest.raises(data.DataError, match=reason) as e:
        data.read_audio(str(path))
    assert "bad.flac" in str(e.value)


def test_fifo_is_never_opened(tmp_path, clip):
    fifo = tmp_path / "pipe.flac"
    os.mkfifo(fifo)
    sf.write(tmp_path / "good.wav", clip, 16000)
    for read in (data.read_audio, data.audio_duration):
        with pytest.raises(data.DataError, match="pipe.flac: not a regular file"):
            returns_within(5, lambda: read(str(fifo)), fifo)
    records = [dict(id="pipe", audio=str(fifo), text="a"), dict(id="good", audio=str(tmp_path / "good.wav"), text="b")]
    report = data.DataReport("fifo")
    kept = returns_within(5, lambda: data.add_durations(records, report), fifo)
    assert [r["id"] for r in kept] == ["good"] and report.counts == {"not a regular file": 1}


# --- text and filters ---------------------------------------------------------------------------------------

def test_normalizer_shared_by_targets_and_wer():
    assert data.normalize_transcript("  HELLO,\tWorld\u0007 ") == "hello, world"
    assert data.normalize_transcript("MIXED Case", lowercase=False) == "MIXED Case"
    assert data.normalize_for_wer("Don't  STOP, now!") == "don't stop now"
    for normalizer in data.WER_NORMALIZERS:
        scores = data.word_error_rate(["the cat sat", "a b", "   "], ["the cat sat down", "a", "x y"], normalizer)
        assert (scores["substitutions"], scores["deletions"], scores["insertions"], scores["words"]) == (0, 1, 3, 5)
        assert scores["wer"] == pytest.approx(4 / 5) and scores["normalizer"] == normalizer
    # Whisper's English normalizer: what published figures use (spellings, numbers, contractions)
    whisper = data.word_error_rate(["Mister Smith isn't twenty five"], ["mr smith is not 25"])
    assert whisper["wer"] == 0 and whisper["normalizer"] == "whisper"
    assert data.word_error_rate(["Mister Smith isn't twenty five"], ["mr smith is not 25"], "simple")["wer"] > 0.5
    with pytest.raises(ValueError, match="unknown WER normalizer"):
        data.word_error_rate(["a"], ["a"], "whisperr")


def test_filters_count_what_they_drop():
    records = [dict(id=str(i), audio="x", text=t, duration=d) for i, (t, d) in enumerate(
        [("ok", 3.0), ("", 3.0), ("   \t", 3.0), ("short", 0.2), ("long", 40.0), ("café ✓ 日本", 2.0),
         ("nan", float("nan")), ("negative", -1.0), ("inf", float("inf"))])]
    report = data.DataReport("f")
    kept = data.filter_records(records, report, min_duration=0.5, max_duration=30.0)
    assert [r["id"] for r in kept] == ["0", "5"]
    assert report.counts == {"empty transcript": 2, "shorter than 0.5 s": 1, "longer than --max_duration 30 s": 1,
                             "duration is not a finite number >= 0": 3}
    with pytest.raises(data.DataError, match="strict_data"):
        report.log(strict_data=True)


def test_odd_characters_tokenize_and_train():
    collator = data.SpeechCollator(tiny_processor())
    batch = collator([dict(audio=np.ones(4000, np.float32), text="café ✓ 日本 ½", skipped=[])])
    assert (batch["labels"] != -100).sum() > 5


def test_librispeech_folder_problems(tmp_path):
    root = tmp_path / "LibriSpeech"
    shutil.copytree(FIXTURE / "dev-clean", root / "dev-clean")
    (root / "dev-clean/2001/3001/2001-3001.trans.txt").unlink()  # missing transcript file
    trans = root / "dev-clean/2002/3002/2002-3002.trans.txt"
    trans.write_text(trans.read_text() + "garbage line without an id\n2002-3002-0009 NO SUCH FILE\n")
    report = data.DataReport("ls")
    records = data.index_librispeech(root, "dev-clean", report)
    kept = data.add_durations(records, report)
    assert [r["id"] for r in kept] == ["2002-3002-0000", "2002-3002-0001"]
    assert report.counts == {"no .trans.txt in its chapter folder": 2, "malformed .trans.txt line": 1,
                             "missing audio file": 1}


# --- loading with bad clips, collator -------------------------------------------------------------------------

def test_bad_clip_is_replaced_and_counted(tmp_path, clip):
    sf.write(tmp_path / "good.wav", clip, 16000)
    (tmp_path / "broken.wav").write_bytes(b"RIFF0000WAVEjunk")
    records = [dict(id="broken", audio=str(tmp_path / "broken.wav"), text="a", duration=1.0),
               dict(id="gone", audio=str(tmp_path / "gone.wav"), text="b", duration=1.0),
               dict(id="good", audio=str(tmp_path / "good.wav"), text="c", duration=1.0)]
    dataset = data.SpeechDataset(records)
    sample = dataset[0]
    assert sample["id"] == "good"
    assert [s[0] for s in sample["skipped"]] == ["broken", "gone"]
    assert "missing audio file" in sample["skipped"][1][1]
    with pytest.raises(data.DataError, match="broken.wav"):
        data.SpeechDataset(records, strict_data=True)[0]
    with pytest.raises(data.DataError, match="consecutive"):
        data.SpeechDataset(records[:2])[0]


def test_collator_shapes_and_masks(clip):
    _, _, tokenizer, fe = tiny_backbones()
    samples = [dict(audio=clip[:8000], text="the ship", skipped=[("x", "bad")]),
               dict(audio=clip, text="she opened the old book", skipped=[])]
    short = tokenizer("the ship", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    batch = data.SpeechCollator(tiny_processor(), max_target_tokens=len(short))(samples)
    assert batch["input_values"].shape == (2, len(clip))
    assert batch["audio_lengths"].tolist() == [8000, len(clip)]
    assert (batch["input_values"][0, 8000:] == 0).all()
    assert batch["labels"][0].tolist() == short  # fits exactly: not truncated
    assert batch["labels"].shape[1] == len(short)
    assert batch["labels"][1, -1] == tokenizer.eos_token_id  # truncated, EOS kept
    assert batch["data_stats"] == {"samples": 2, "skipped": [("x", "bad")], "truncated": 1, "filtered": {}}
    assert torch.isfinite(batch["input_values"]).all()
