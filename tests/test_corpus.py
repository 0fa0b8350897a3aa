"""The sources and the one filter (corpus.py)."""
import json
import shutil

import numpy as np
import pytest
import soundfile as sf
from conftest import FIXTURE, build_dataset, hub_dataset, hub_rows

import corpus
from audio import SAMPLE_RATE, DataError
from corpus import (
    ClipFilter,
    DataReport,
    Record,
    index_librispeech,
    prepare,
    read_manifest,
    records_from_hub,
)


def test_librispeech_folder():
    report = DataReport("t")
    records = index_librispeech(FIXTURE, "test-clean,dev-clean", report)
    assert len(records) == 8 and not report.counts
    first = records[0]
    assert first.id == "3001-4001-0000" and first.text == "THE WIND BLEW ALL NIGHT"
    dataset = build_dataset("t", records, report)
    sample = dataset[0]
    assert sample.text == "the wind blew all night" and sample.skipped == []
    assert abs(dataset.durations[0] - len(sample.audio) / SAMPLE_RATE) < 1e-3
    with pytest.raises(FileNotFoundError, match="train-other-500"):
        index_librispeech(FIXTURE, "train-other-500", report)


def test_hub_schema_built_locally(clip):
    rows = hub_rows("dev-clean")
    report = DataReport("hub")
    records, hub = records_from_hub(hub_dataset(rows), report)
    assert [r.id for r in records] == [r["id"] for r in rows]
    dataset = build_dataset("hub", records, report, hub_dataset=hub)
    audio, _ = sf.read(rows[2]["file"], dtype="float32")
    np.testing.assert_array_equal(dataset[2].audio, audio)
    assert dataset[2].text == rows[2]["text"].lower()


def test_hub_rows_are_known_by_dataset_and_row():
    rows = hub_rows("dev-clean")
    identities = lambda rows: [r.identity for r in records_from_hub(  # noqa: E731
        hub_dataset(rows), DataReport("hub"))[0]]
    first = identities(rows)
    assert len(set(first)) == len(rows)
    assert identities(rows) == first  # the same data, indexed again (the next run), finds its cache entries
    assert identities(rows[::-1])[0] != first[0]  # other audio in row 0: another entry


def test_manifest_and_malformed_lines(tmp_path, clip):
    sf.write(tmp_path / "a.wav", clip, 16000)
    lines = [json.dumps({"audio": "a.wav", "text": "Hello  World"}), "{not json", json.dumps({"text": "no audio"}),
             json.dumps({"audio": "a.wav", "text": 5}), "", json.dumps({"audio": "a.wav", "text": "x", "id": "u2"})]
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    report = DataReport("m")
    records = read_manifest(tmp_path / "m.jsonl", report)
    assert [r.id for r in records] == ["a.wav", "u2"]
    assert report.counts == {"manifest line is not JSON": 1, 'manifest line lacks a string "audio" or "text"': 2}
    assert build_dataset("m", records, report)[0].text == "Hello World"  # mixed case is kept (--transcript_case)


def test_manifest_duration_is_checked_against_the_header(tmp_path, clip):
    sf.write(tmp_path / "a.wav", clip, 16000)
    sf.write(tmp_path / "long.wav", np.zeros(40 * 16000, np.int16), 16000)
    seconds = len(clip) / 16000
    listed = [("long.wav", 2.0), ("a.wav", float("nan")), ("a.wav", -1.0), ("a.wav", "3"), ("a.wav", seconds + 0.2),
              ("long.wav", None)]
    lines = [json.dumps({"audio": a, "text": "x", "id": str(i), **({} if d is None else {"duration": d})})
             for i, (a, d) in enumerate(listed)]
    (tmp_path / "m.jsonl").write_text("\n".join(lines))  # json writes the float NaN as NaN, and reads it back
    report = DataReport("m")
    dataset = build_dataset("m", read_manifest(tmp_path / "m.jsonl", report), report, max_duration=30.0)
    assert [r.id for r in dataset.records] == ["4"]
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
    report = DataReport("m")
    dataset = build_dataset("m", read_manifest(tmp_path / "m.jsonl", report), report)
    assert [(r.id, r.text) for r in dataset.records] == [("u1", "first"), ("u2", "third")]
    assert report.counts == {"duplicate id": 1}


def test_filters_count_what_they_drop():
    records = [Record(id=str(i), text=t, path="x", duration=d) for i, (t, d) in enumerate(
        [("ok", 3.0), ("", 3.0), ("   \t", 3.0), ("short", 0.2), ("long", 40.0), ("café ✓ 日本", 2.0),
         ("nan", float("nan")), ("negative", -1.0), ("inf", float("inf"))])]
    report = DataReport("f")
    kept = prepare("f", records, report, ClipFilter(min_duration=0.5, max_duration=30.0))
    assert [r.id for r in kept] == ["0", "5"]
    assert report.counts == {"empty transcript": 2, "shorter than 0.5 s": 1, "longer than --max_duration 30 s": 1,
                             "duration is not a finite number >= 0": 3}
    with pytest.raises(DataError, match="strict_data"):
        report.log(strict_data=True)


def test_librispeech_folder_problems(tmp_path):
    root = tmp_path / "LibriSpeech"
    shutil.copytree(FIXTURE / "dev-clean", root / "dev-clean")
    (root / "dev-clean/2001/3001/2001-3001.trans.txt").unlink()  # missing transcript file
    trans = root / "dev-clean/2002/3002/2002-3002.trans.txt"
    trans.write_text(trans.read_text() + "garbage line without an id\n2002-3002-0009 NO SUCH FILE\n")
    report = DataReport("ls")
    records = index_librispeech(root, "dev-clean", report)
    kept = corpus.with_durations(records, report)
    assert [r.id for r in kept] == ["2002-3002-0000", "2002-3002-0001"]
    assert report.counts == {"no .trans.txt in its chapter folder": 2, "malformed .trans.txt line": 1,
                             "missing audio file": 1}


def test_text_that_is_not_utf8_is_counted_not_trained_as_replacement_characters(tmp_path, clip):
    chapter = tmp_path / "LibriSpeech" / "dev-clean" / "1" / "2"
    chapter.mkdir(parents=True)
    for utt in ("1-2-0000", "1-2-0001"):
        sf.write(chapter / f"{utt}.flac", clip, 16000)
    (chapter / "1-2.trans.txt").write_bytes("1-2-0000 A CAF\xc9 OF LATIN ONE\n1-2-0001 FINE\n".encode("latin-1"))
    report = DataReport("ls")
    records = index_librispeech(tmp_path / "LibriSpeech", "dev-clean", report)
    assert [r.text for r in records] == ["FINE"] and not any("\ufffd" in r.text for r in records)
    assert report.counts["line is not UTF-8 text (convert the file: iconv -f latin1 -t utf-8)"] == 1
    sf.write(tmp_path / "a.wav", clip, 16000)
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes("\ufeff".encode() + b'{"audio": "a.wav", "text": "first"}\n'  # a byte-order mark
                         + '{"audio": "a.wav", "text": "caf\xe9", "id": "2"}\n'.encode("latin-1"))
    report = DataReport("m")
    assert [r.text for r in read_manifest(manifest, report)] == ["first"]  # line 1 is not lost to the mark
    assert report.examples["line is not UTF-8 text (convert the file: iconv -f latin1 -t utf-8)"] == [f"{manifest}:2"]


def layout(kind, rows):
    """The fixture rows in the column layout of Common Voice (`sentence`, its own `path` column, mixed case with
    punctuation), FLEURS (`transcription`, `raw_transcription`, no `id`) or a plain audio + text dataset."""
    import datasets

    out = []
    for i, r in enumerate(rows):
        text = r["text"].capitalize() + "."
        if kind == "common_voice":
            out.append({"client_id": "x", "path": r["audio"]["path"], "audio": r["audio"], "sentence": text})
        elif kind == "fleurs":
            out.append({"num_samples": i, "audio": r["audio"], "transcription": r["text"].lower(),
                        "raw_transcription": text})
        else:
            out.append({"audio": r["audio"], "text": text})
    return datasets.Dataset.from_list(out).cast_column("audio", datasets.Audio(decode=False))


@pytest.mark.parametrize("kind, column, case, expected", [
    ("common_voice", None, "auto", "The wind blew all night."),  # Common Voice's case and punctuation, kept
    ("fleurs", None, "auto", "the wind blew all night"),  # FLEURS' `transcription` is normalized already
    ("fleurs", "raw_transcription", "lower", "the wind blew all night."),
    ("plain", None, "upper", "THE WIND BLEW ALL NIGHT."),
])
def test_any_speech_dataset_by_its_columns(kind, column, case, expected, caplog):
    rows = hub_rows("test-clean")
    report = DataReport("hub")
    with caplog.at_level("INFO"):
        records, hub = records_from_hub(layout(kind, rows), report, corpus.Columns(text=column))
    if column is None:
        assert f"transcripts from its {('sentence' if kind == 'common_voice' else 'transcription' if kind == 'fleurs' else 'text')!r} column" in caplog.text
    assert [r.id for r in records] == ([str(i) for i in range(len(rows))])  # no id column: the row number
    dataset = build_dataset("hub", records, report, hub_dataset=hub, case=case)
    assert dataset[0].text == expected and len(dataset[0].audio) > 16000


def test_a_missing_column_is_named_with_the_columns_there_are():
    with pytest.raises(ValueError, match=r"has no text column \(none of text, sentence.*its columns are \['audio', "
                                         r"'words'\]; pass --text_column"):
        records_from_hub(layout("plain", hub_rows("dev-clean")).rename_column("text", "words"), DataReport("x"))


def test_each_clip_names_its_language_in_a_manifest_or_a_column(tmp_path, clip):
    sf.write(tmp_path / "a.wav", clip, 16000)
    lines = [{"audio": "a.wav", "text": "bonjour", "language": " French ", "id": "1"},
             {"audio": "a.wav", "text": "hallo", "language": "German", "id": "2"},
             {"audio": "a.wav", "text": "x", "language": 3, "id": "3"},
             {"audio": "a.wav", "text": "x", "language": "<speech>", "id": "4"},
             {"audio": "a.wav", "text": "hello", "id": "5"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = DataReport("m")
    records = read_manifest(tmp_path / "m.jsonl", report)
    assert [r.language for r in records] == ["French", "German", None]
    assert report.counts == {'manifest "language" is not a language\'s name or code': 2}
    # the run's languages: a clip that names none speaks --language; other languages are left out, counted
    kept = prepare("m", records, report, ClipFilter(language="English", languages=("English", "French")))
    assert [(r.id, r.language) for r in kept] == [("1", "French"), ("5", "English")]
    assert report.counts["language 'German' is not one of --languages"] == 1
    unnamed = DataReport("m")
    with pytest.raises(DataError, match="no usable clips"):  # no --language: the clip without one is left out
        prepare("m", records[2:], unnamed, ClipFilter(languages=("English",)))
    assert unnamed.counts == {"no language (give each clip one, or --language for those without)": 1}


def test_a_hub_language_column_names_each_clips_language():
    rows = hub_rows("test-clean")
    dataset = layout("fleurs", rows).add_column("language", ["English", "Deutsch"] * (len(rows) // 2)
                                                 + ["English"] * (len(rows) % 2))
    report = DataReport("hub")
    records, hub = records_from_hub(dataset, report, corpus.Columns(language="language"))
    assert [r.language for r in records][:2] == ["English", "Deutsch"]
    kept = prepare("hub", records, report, ClipFilter(languages=("Deutsch",)))
    assert {r.language for r in kept} == {"Deutsch"} and report.counts["language 'English' is not one of --languages"]
    with pytest.raises(ValueError, match=r"has no language column locale: its columns are .*pass --language_column"):
        records_from_hub(dataset, report, corpus.Columns(language="locale"))
