"""
Audio and transcripts: reading, resampling, normalizing, indexing the three sources (the hub copy of
LibriSpeech, a LibriSpeech folder, a JSON-lines manifest), filtering, and batching.

Every source becomes a list of records {id, audio, text, duration, audio_identity}; `audio` is a file path,
or a row of the hub dataset; `audio_identity` names the audio itself (see file_identity), for the feature
cache. Problems found while indexing are counted per reason in a `DataReport`; a clip that fails
while a batch is loaded is replaced by the next good one and counted, so a long run never dies on one bad
file (`strict_data=True` makes either an immediate error).
"""

import hashlib
import io
import json
import logging
import math
import os
import re
import stat
import unicodedata
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from tqdm.auto import tqdm


logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000  # every clip is resampled to the encoder's rate: this for HuBERT, WavLM, wav2vec2, Whisper
MIN_AUDIO_SAMPLES = 400  # HuBERT's conv front end sees 400 samples (25 ms) per frame: shorter clips give none
MAX_REPLACEMENTS = 16  # consecutive bad clips tolerated while loading before the data is declared broken
# a manifest "duration" further than this from the file's header says the line does not describe that file
DURATION_TOLERANCE = 0.5  # seconds: rounding and a few trimmed frames stay within it


class DataError(ValueError):
    """A clip or an index entry that cannot be used, with the file and the reason."""


# ----------------------------------------------------------------------------------------------------------
# Text: the training targets' normalization, and the WER normalizers every reported figure names


def normalize_transcript(text, lowercase=True):
    """Unicode NFKC, control characters dropped, whitespace collapsed; LibriSpeech's upper case lowered."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(c if unicodedata.category(c)[0] != "C" else " " for c in text)
    text = " ".join(text.split())
    return text.lower() if lowercase else text


def normalize_for_wer(text):
    """The training normalization, lower-cased, with punctuation other than apostrophes removed."""
    text = normalize_transcript(text, lowercase=True)
    return " ".join(re.sub(r"[^\w\s']", " ", text).split())


def whisper_english_normalizer():
    """The Whisper English normalizer (spellings, numbers, contractions), from the whisper-normalizer package:
    what published LibriSpeech WERs use (Ultravox, SLAM-LLM), so that ours compare with theirs."""
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


# name -> a function that makes the normalizer; "whisper" is the default of every WER this project reports
WER_NORMALIZERS = {"whisper": whisper_english_normalizer, "simple": lambda: normalize_for_wer}


def word_error_rate(references, hypotheses, normalizer="whisper"):
    """Corpus WER after the named normalizer (WER_NORMALIZERS): {wer, substitutions, deletions, insertions,
    words, normalizer}."""
    import jiwer

    if normalizer not in WER_NORMALIZERS:
        raise ValueError(f"unknown WER normalizer {normalizer!r}: choose from {list(WER_NORMALIZERS)}")
    normalize = WER_NORMALIZERS[normalizer]()
    refs = [" ".join(normalize(r).split()) for r in references]
    hyps = [" ".join(normalize(h).split()) for h in hypotheses]
    # jiwer refuses empty references; every word hypothesized for one is an insertion
    insertions = sum(len(h.split()) for r, h in zip(refs, hyps) if not r)
    pairs = [(r, h) for r, h in zip(refs, hyps) if r]
    counts = dict(substitutions=0, deletions=0, insertions=insertions, words=0)
    if pairs:
        out = jiwer.process_words([r for r, _ in pairs], [h for _, h in pairs])
        counts["substitutions"] += out.substitutions
        counts["deletions"] += out.deletions
        counts["insertions"] += out.insertions
        counts["words"] = out.hits + out.substitutions + out.deletions
    errors = counts["substitutions"] + counts["deletions"] + counts["insertions"]
    counts["wer"] = errors / max(counts["words"], 1)
    counts["normalizer"] = normalizer
    return counts


def decoding_name(num_beams):
    """How a hypothesis was decoded, as every WER line and the model card name it."""
    return "greedy" if num_beams == 1 else f"beam search, {num_beams} beams"


def wer_line(scores, decoding=None):
    """The one way a WER is reported: the figure, the counts, and what made it (decoding, normalizer)."""
    how = ", ".join(filter(None, [decoding, f"{scores['normalizer']} normalizer"]))
    return (f"WER {100 * scores['wer']:.2f}% ({how}): {scores['words']} words, {scores['substitutions']} "
            f"substitutions, {scores['deletions']} deletions, {scores['insertions']} insertions")


# ----------------------------------------------------------------------------------------------------------
# Audio


def file_problem(path):
    """Why the audio file at `path` must not be opened, or None. Only regular files are opened: opening a FIFO
    (or a device) named *.flac blocks until something writes to it, forever, and Ctrl-C cannot interrupt it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing audio file"
    except OSError as e:
        return f"cannot stat the audio file ({e.strerror})"
    return None if stat.S_ISREG(mode) else "not a regular file"


def check_file(source):
    """Raises DataError naming the file when `source` is a path that must not be opened (see file_problem)."""
    if isinstance(source, (str, Path)):
        problem = file_problem(source)
        if problem:
            raise DataError(f"{source}: {problem}")


def read_audio(source, sampling_rate=SAMPLE_RATE):
    """A file path or bytes -> 1-D float32 at `sampling_rate` (mixed to mono, resampled).
    Raises DataError for missing, non-regular, unreadable, empty, too short or non-finite audio."""
    name = source if isinstance(source, (str, Path)) else "<bytes>"
    check_file(source)
    try:
        data, rate = sf.read(io.BytesIO(source) if isinstance(source, bytes) else source, dtype="float32",
                             always_2d=True)  # (samples, channels); integer formats scaled to [-1, 1]
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as e:
        raise DataError(f"{name}: cannot read audio ({e})") from None
    audio = data.mean(axis=1)  # (samples,)
    if not np.isfinite(audio).all():
        raise DataError(f"{name}: audio contains NaN or Inf samples")
    if rate != sampling_rate and len(audio):
        audio = soxr.resample(audio, rate, sampling_rate).astype(np.float32)
    if len(audio) < MIN_AUDIO_SAMPLES * sampling_rate // SAMPLE_RATE:
        raise DataError(f"{name}: audio too short ({len(audio)} samples at {sampling_rate} Hz; the encoder needs "
                        f"at least {MIN_AUDIO_SAMPLES * sampling_rate // SAMPLE_RATE})")
    return audio


def load_clips(load, records):
    """Reads each record with `load(record) -> audio`: (records read, their audios, [(record, reason)] of the
    rest). Used wherever a batch must go on without the clips that cannot be read."""
    loaded, audios, failed = [], [], []
    for record in records:
        try:
            audios.append(load(record))
            loaded.append(record)
        except DataError as e:
            failed.append((record, str(e)))
    return loaded, audios, failed


def clip_batches(records, load, batches, desc, disable=False):
    """How inference reads its clips (the feature cache fill, the eval WER; transcribe.py, whose queue also holds
    the windows of long inputs, calls load_clips per batch itself): `records` in `batches` (a batch size, taken
    in the caller's order, or lists of indices into `records`, as fill_batches makes them), each batch as
    `load_clips` gives it, under a progress bar."""
    if isinstance(batches, int):
        batches = [range(start, min(start + batches, len(records))) for start in range(0, len(records), batches)]
    with tqdm(total=len(records), desc=desc, unit="clip", disable=disable or not records) as bar:
        for indices in batches:
            yield load_clips(load, [records[i] for i in indices])
            bar.update(len(indices))


def file_identity(path):
    """What the feature cache knows a file's audio by: resolved path + size + mtime_ns. A stat is free at
    indexing, where a content hash would read all the audio (tens of GB) at every start; a rewritten file gets
    a new identity."""
    st = os.stat(path)
    return f"file:{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"


def audio_duration(source):
    """Seconds, from the file header alone (no decoding). Raises DataError naming the file when it cannot."""
    check_file(source)
    name = source if isinstance(source, (str, Path)) else "<bytes>"
    try:
        info = sf.info(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as e:
        raise DataError(f"{name}: cannot read audio ({e})") from None
    return info.frames / info.samplerate


CUT_SEARCH_SECONDS = 5.0  # a long recording is cut at the quietest point in this last stretch of each window


def quiet_cuts(audio, sampling_rate=SAMPLE_RATE, max_seconds=30.0, search_seconds=CUT_SEARCH_SECONDS):
    """Where to cut a long recording into windows for the encoder: [(start, end)] sample ranges that cover
    `audio` exactly once, in order, none longer than `max_seconds`. Each window ends at the quietest 25 ms frame
    (lowest mean square, the frame centred on the cut) in its last `search_seconds`, so that a cut falls
    between words where the recording has a pause; in a run of equally quiet frames (digital silence) it falls
    in the middle of the run. No window is shorter than the encoder's minimum (MIN_AUDIO_SAMPLES): the last cut
    is searched only where it leaves that much after it."""
    n = len(audio)
    min_len = MIN_AUDIO_SAMPLES * sampling_rate // SAMPLE_RATE  # also the frame: the encoder's own 25 ms
    max_len = int(max_seconds * sampling_rate)
    if max_len < 2 * min_len:
        raise ValueError(f"max_seconds={max_seconds} is too short: a window must hold two encoder frames")
    half = min_len // 2
    cuts, start = [], 0
    while n - start > max_len:
        hi = min(start + max_len, n - min_len)  # the window and what is left both long enough
        lo = min(max(start + min_len, start + max_len - int(search_seconds * sampling_rate)), hi)
        # the frame centred on each candidate cut c in [lo, hi] is audio[c - half : c - half + min_len], inside
        # the audio because lo >= min_len and hi <= n - min_len; running sums over this stretch only (float64 over
        # an hour's samples would be half a gigabyte)
        stretch = audio[lo - half: hi - half + min_len].astype(np.float64)
        squares = np.concatenate([[0.0], np.cumsum(stretch * stretch)])  # (hi - lo + min_len + 1,)
        energy = squares[min_len:] - squares[:-min_len]  # (hi - lo + 1,): the frame centred on lo, lo + 1, ...
        best = int(np.argmin(energy))
        run = int(np.argmax(energy[best:] > energy[best])) or len(energy) - best  # equally quiet frames from best
        cut = lo + best + run // 2
        cuts.append((start, cut))
        start = cut
    return cuts + [(start, n)]


# ----------------------------------------------------------------------------------------------------------
# Indexing: the three sources -> records


class DataReport:
    """What was dropped while indexing, per reason, with the first few examples of each."""

    def __init__(self, name):
        self.name = name
        self.counts = Counter()
        self.examples = {}

    def add(self, reason, example):
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(str(example))

    def log(self, strict_data=False):
        if not self.counts:
            logger.info(f"{self.name}: nothing dropped")
            return
        lines = [f"{self.name}: dropped {sum(self.counts.values())} entries"]
        for reason, n in self.counts.most_common():
            lines.append(f"  {n:7d}  {reason}  (e.g. {'; '.join(self.examples[reason])})")
        message = "\n".join(lines)
        if strict_data:
            raise DataError(message + "\n(--strict_data is on: fix these or drop --strict_data to skip them)")
        logger.warning(message)


def index_librispeech(root, splits, report):
    """Records from `<root>/<split>/<speaker>/<chapter>/` folders (openslr layout); `splits` comma-separated."""
    root = Path(root)
    records = []
    for split in [s.strip() for s in splits.split(",") if s.strip()]:
        split_dir = root / split
        if not split_dir.is_dir():
            found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            raise FileNotFoundError(f"{split_dir} not found: --librispeech_dir should hold LibriSpeech split folders "
                                    f"such as train-clean-100; found {found}")
        for chapter in sorted(p for p in split_dir.glob("*/*") if p.is_dir()):
            trans = chapter / f"{chapter.parent.name}-{chapter.name}.trans.txt"
            flacs = sorted(chapter.glob("*.flac"))
            if not trans.is_file():
                for flac in flacs:
                    report.add("no .trans.txt in its chapter folder", flac)
                continue
            listed = set()
            for lineno, line in enumerate(trans.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if not line.strip():
                    continue
                utt, _, text = line.strip().partition(" ")
                if not re.fullmatch(r"\d+-\d+-\d+", utt):
                    report.add("malformed .trans.txt line", f"{trans}:{lineno}")
                    continue
                listed.add(utt)
                records.append(dict(id=utt, audio=str(chapter / f"{utt}.flac"), text=text))
            for flac in flacs:
                if flac.stem not in listed:
                    report.add("audio without a transcript line", flac)
    return records


def read_manifest(path, report, require_text=True):
    """Records from a JSON-lines manifest: {"audio": path (relative to the manifest), "text": ...}, optional
    "id" and "duration". A listed duration is kept as `listed_duration` to be checked against the file's
    header (add_durations); it is never used in place of the header's."""
    base = Path(path).parent
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                report.add("manifest line is not JSON", where)
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("audio"), str) or (
                require_text and not isinstance(entry.get("text"), str)
            ):
                report.add('manifest line lacks a string "audio"' + (' or "text"' if require_text else ""), where)
                continue
            audio = str(base / entry["audio"])
            record = dict(id=str(entry.get("id", entry["audio"])), audio=audio, text=entry.get("text", ""))
            if "duration" in entry:
                listed = entry["duration"]  # json.loads accepts NaN and Infinity
                if isinstance(listed, bool) or not isinstance(listed, (int, float)) or not (
                        math.isfinite(listed) and listed >= 0):
                    report.add('manifest "duration" is not a finite number >= 0', where)
                    continue
                record["listed_duration"] = float(listed)
            records.append(record)
    return records


def load_hub_librispeech(name, config, split, streaming=False, cache_dir=None):
    """The hub copy of LibriSpeech (no loading script), with audio left undecoded: we decode with soundfile."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, config, split=split, streaming=streaming, cache_dir=cache_dir)
    except Exception as e:  # datasets raises many types for "not reachable"; say what to do in every case
        raise OSError(f"could not load the dataset {name!r} (config {config!r}, split {split!r}): {e}. Offline? "
                      "Use --librispeech_dir with a local LibriSpeech folder, or --train_manifest.") from None
    return dataset.cast_column("audio", datasets.Audio(decode=False))


def records_from_hub(dataset, report, num_proc=None):
    """Records from a (non-streaming) `datasets.Dataset` with LibriSpeech's hub schema (id, audio, text).
    Durations come from each clip's header, computed once and cached by `datasets`. A row's audio identity is
    the dataset's fingerprint (which `datasets` derives from its data files and transforms) + the row: free,
    where hashing the bytes would read the whole split at every start."""
    import datasets

    if isinstance(dataset.features["audio"], datasets.Audio) and dataset.features["audio"].decode:
        dataset = dataset.cast_column("audio", datasets.Audio(decode=False))

    def header(batch):
        durations = []
        for audio in batch["audio"]:
            try:
                durations.append(audio_duration(audio["bytes"] if audio.get("bytes") else audio["path"]))
            except Exception:
                durations.append(-1.0)  # unreadable: reported below
        return {"duration": durations}

    durations = dataset.map(header, batched=True, num_proc=num_proc, desc="reading audio headers",
                            remove_columns=dataset.column_names)["duration"]
    records = []
    for row, (utt, text, duration) in enumerate(zip(dataset["id"], dataset["text"], durations)):
        if duration < 0:
            report.add("unreadable audio", utt)
            continue
        records.append(dict(id=utt, audio=row, text=text, duration=duration,
                            audio_identity=f"hub:{dataset._fingerprint}:{row}"))
    return records, dataset


def add_durations(records, report, num_workers=8):
    """Fills each record's duration from its file header (threads: header reads are I/O bound), and drops the
    records whose manifest-listed duration disagrees with it: a filter on a wrong duration would let a 40 s
    clip labelled 2 s past --max_duration."""
    todo = [r for r in records if "duration" not in r]  # hub rows have theirs, from their headers

    def probe(record):
        try:
            return audio_duration(record["audio"]), file_identity(record["audio"])
        except (DataError, OSError) as e:  # OSError: removed between the two
            return e

    with ThreadPoolExecutor(num_workers) as pool:
        results = list(tqdm(pool.map(probe, todo), total=len(todo), desc="reading audio headers", disable=not todo))
    for record, result in zip(todo, results):
        if isinstance(result, Exception):
            report.add(file_problem(record["audio"]) or "unreadable audio", record["audio"])
            record["duration"] = None
        elif abs(record.get("listed_duration", result[0]) - result[0]) > DURATION_TOLERANCE:
            report.add(f"manifest duration differs from the audio header by more than {DURATION_TOLERANCE:g} s",
                       f"{record['audio']}: listed {record['listed_duration']:g} s, header {result[0]:.2f} s")
            record["duration"] = None
        else:
            record["duration"], record["audio_identity"] = result
    return [r for r in records if r["duration"] is not None]


def drop_duplicate_ids(records, report):
    """Keeps the first record of each id: ids name clips in logs, skip counts and evaluation predictions, so
    two clips under one id could not be told apart there."""
    seen, kept = set(), []
    for r in records:
        if r["id"] in seen:
            report.add("duplicate id", r["id"])
        else:
            seen.add(r["id"])
            kept.append(r)
    return kept


def drop_reason(text, duration, min_duration=0.0, max_duration=float("inf"), special_tokens=()):
    """Why a clip with this (normalized) transcript and duration is not trained on, or None to keep it.
    `special_tokens`: the LLM's (processor.special_tokens); one written out in a transcript would be trained as
    that token (a "</s>" as an EOS in mid-sentence)."""
    min_duration = max(min_duration, MIN_AUDIO_SAMPLES / SAMPLE_RATE)
    if not text:
        return "empty transcript"
    special = next((t for t in special_tokens if t in text), None)
    if special is not None:
        return f"transcript holds the LLM's special token {special}"
    if not (math.isfinite(duration) and duration >= 0):  # NaN compares false with every bound below
        return "duration is not a finite number >= 0"
    if duration < min_duration:
        return f"shorter than {min_duration:g} s"
    if duration > max_duration:
        return f"longer than --max_duration {max_duration:g} s"
    return None


def filter_records(records, report, min_duration=0.0, max_duration=float("inf"), lowercase=True, special_tokens=()):
    """Normalizes transcripts and drops what drop_reason names: empty ones, ones holding the LLM's special
    tokens, clips outside [min_duration, max_duration] seconds."""
    kept = []
    for r in records:
        text = normalize_transcript(r["text"], lowercase)
        reason = drop_reason(text, r["duration"], min_duration, max_duration, special_tokens)
        if reason:
            report.add(reason, r["id"])
        else:
            kept.append({**r, "text": text})
    return kept


# ----------------------------------------------------------------------------------------------------------
# Loading and batching


def skip_bad_clip(clip_id, error, skipped, strict_data=False):
    """A clip that failed to load: an error under --strict_data, otherwise a warning and an entry in
    `skipped`, which travels with the batch so that the trainer counts it."""
    if strict_data:
        raise DataError(f"{clip_id}: {error} (--strict_data is on)") from None
    logger.warning(f"skipping {clip_id}: {error}")
    skipped.append((clip_id, str(error)))


class RecordDataset(torch.utils.data.Dataset):
    """A dataset over records; `durations` is what the length-grouped samplers and the run summary read."""

    def __len__(self):
        return len(self.records)

    @property
    def durations(self):
        return [r["duration"] for r in self.records]


class SpeechDataset(RecordDataset):
    """Records -> samples {id, audio (1-D float32), text, skipped}. A clip that fails to load is replaced by
    the next good one, with a warning; `skipped` carries (id, reason) of the clips it replaced so that the
    trainer counts them, DataLoader workers included."""

    def __init__(self, records, sampling_rate=SAMPLE_RATE, hub_dataset=None, strict_data=False):
        self.records = records
        self.sampling_rate = sampling_rate
        self.hub_dataset = hub_dataset
        self.strict_data = strict_data

    def load(self, record):
        source = record["audio"]
        if isinstance(source, int):  # a row of the hub dataset
            audio = self.hub_dataset[source]["audio"]
            source = audio["bytes"] or audio["path"]
        return read_audio(source, self.sampling_rate)

    def __getitem__(self, index):
        skipped = []
        for attempt in range(MAX_REPLACEMENTS):
            record = self.records[(index + attempt) % len(self.records)]
            try:
                audio = self.load(record)
            except DataError as e:
                skip_bad_clip(record["id"], e, skipped, self.strict_data)
                continue
            return dict(id=record["id"], audio=audio, text=record["text"], skipped=skipped)
        raise DataError(f"{MAX_REPLACEMENTS} consecutive clips failed to load, the last: {skipped[-1][1]}. "
                        "The data is broken beyond skipping; check the paths and files.")


class StreamingSpeechDataset(torch.utils.data.IterableDataset):
    """Samples {id, audio, text, skipped, filtered} from a streaming hub dataset (`datasets.IterableDataset`,
    audio undecoded), decoded and filtered as they arrive; `filtered` counts, per reason, the clips dropped
    since the previous sample. Nothing is indexed up front, so there is no length: the run's length is
    --max_steps.

    Each rank reads its own part of the stream: whole shard files when they divide evenly over the ranks,
    otherwise every world-th clip (undecoded bytes are cheap to pass over). DataLoader workers split that part
    by shard file. The stream restarts, reshuffled, whenever this rank's part ends, so that ranks whose parts
    differ in length still take the same number of steps (a rank that ran dry would hang the others)."""

    def __init__(self, stream, rank=0, world=1, seed=0, shuffle_buffer=1000, min_duration=0.0,
                 max_duration=float("inf"), lowercase=True, strict_data=False, sampling_rate=SAMPLE_RATE,
                 special_tokens=()):
        from datasets.distributed import split_dataset_by_node

        if shuffle_buffer > 0:  # the same seed on every rank: they must agree on the shard order to split it
            stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer)
        self.stream = split_dataset_by_node(stream, rank, world) if world > 1 else stream
        self.shards_per_rank = stream.num_shards // world if stream.num_shards % world == 0 else stream.num_shards
        self.min_duration, self.max_duration = min_duration, max_duration
        self.lowercase = lowercase
        self.strict_data = strict_data
        self.sampling_rate = sampling_rate
        self.special_tokens = special_tokens

    def __iter__(self):
        epoch = 0
        skipped, filtered = [], Counter()
        while True:
            self.stream.set_epoch(epoch)  # a new shard order and shuffle for each pass
            seen = kept = 0
            for row in self.stream:
                seen += 1
                audio = row["audio"]
                try:
                    samples = read_audio(audio.get("bytes") or audio["path"], self.sampling_rate)
                except DataError as e:
                    skip_bad_clip(row["id"], e, skipped, self.strict_data)
                    continue
                text = normalize_transcript(row["text"], self.lowercase)
                reason = drop_reason(text, len(samples) / self.sampling_rate, self.min_duration, self.max_duration,
                                     self.special_tokens)
                if reason:
                    if self.strict_data:
                        raise DataError(f"{row['id']}: {reason} (--strict_data is on)")
                    filtered[reason] += 1
                    continue
                yield dict(id=row["id"], audio=samples, text=text, skipped=skipped, filtered=dict(filtered))
                skipped, filtered = [], Counter()
                kept += 1
            if seen == 0:
                return  # a DataLoader worker left without shard files: the other workers carry the stream
            if kept == 0:
                raise DataError(f"a whole pass over the stream gave no usable clip ({seen} read; dropped: "
                                f"{dict(filtered)}, unreadable: {len(skipped)}): check the split and the filters")
            epoch += 1


class SpeechCollator:
    """Samples -> what SlamASR.forward takes, made by the processor (processor.SlamASRProcessor): input_values
    (or Whisper's input_features) and audio_lengths, or cached encoder_frames and frame_lengths; labels. Plus
    `data_stats` (DataStats.of_batch), which the trainer pops before the forward and counts."""

    def __init__(self, processor, max_target_tokens=None):
        self.processor = processor
        self.max_target_tokens = max_target_tokens

    def __call__(self, samples):
        cached = "frames" in samples[0]  # from the feature cache
        batch = self.processor(audios=None if cached else [s["audio"] for s in samples],
                               texts=[s["text"] for s in samples], max_target_tokens=self.max_target_tokens)
        if cached:
            batch["encoder_frames"], batch["frame_lengths"] = collate_frames(samples)
        batch["data_stats"] = DataStats.of_batch(samples, batch.pop("num_truncated"))
        return batch


class DataStats:
    """What the data did while training, counted from the `data_stats` each batch carries: clips trained on,
    skipped while loading (replaced by the next good one), dropped by a stream's filters, transcripts
    truncated. Each rank counts what its own loader (its workers included) made; `summed` adds the ranks up."""

    def __init__(self):
        self.samples, self.skipped, self.truncated, self.filtered = 0, 0, 0, Counter()

    @staticmethod
    def of_batch(samples, truncated):
        filtered = Counter()
        for s in samples:  # only a stream filters while batching; indexed data is filtered up front
            filtered.update(s.get("filtered", {}))
        return dict(samples=len(samples), skipped=[item for s in samples for item in s["skipped"]],
                    truncated=truncated, filtered=dict(filtered))

    def add(self, batch_stats):
        self.samples += batch_stats["samples"]
        self.skipped += len(batch_stats["skipped"])
        self.truncated += batch_stats["truncated"]
        self.filtered.update(batch_stats["filtered"])

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


def build_dataset(name, records, report, min_duration=0.0, max_duration=float("inf"), lowercase=True,
                  hub_dataset=None, strict_data=False, sampling_rate=SAMPLE_RATE, special_tokens=()):
    """Unique ids, durations, filters, report, dataset: the steps every source goes through after indexing."""
    records = drop_duplicate_ids(records, report)
    records = add_durations(records, report)
    records = filter_records(records, report, min_duration, max_duration, lowercase, special_tokens)
    report.log(strict_data)
    if not records:
        raise DataError(f"{name}: no usable clips left after filtering (see the report above)")
    return SpeechDataset(records, sampling_rate, hub_dataset=hub_dataset, strict_data=strict_data)


# ----------------------------------------------------------------------------------------------------------
# Frozen-encoder feature cache: the encoder never changes, so its output is computed once and read back


class FeatureCache:
    """Encoder outputs per clip in half precision, in safetensors shards under a folder named by a hash of
    (encoder, sample rate, hidden size, dtypes): a cache made by another encoder or setting is never read.
    Entries are named by the audio's identity (`entry_name`), never by utterance id: two manifests' `clip0.flac`
    are two entries, a rewritten file is encoded again, and two ids of one file share one entry.
    Each rank writes its own shards and then its index; a shard missing from an index is recomputed."""

    SHARD_BYTES = 512 * 2**20

    def __init__(self, root, encoder_name, sampling_rate, hidden_size, encoder_dtype, dtype=torch.float16):
        # the encoder's compute dtype is part of the key: fp16 and fp32 encoders give (slightly) other features
        self.key = dict(encoder=encoder_name, sampling_rate=sampling_rate, hidden_size=hidden_size,
                        encoder_dtype=str(encoder_dtype).replace("torch.", ""),
                        dtype=str(dtype).replace("torch.", ""),
                        entries="audio identity")  # caches whose entries were named by utterance id are not read
        digest = hashlib.sha1(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:12]
        self.dir = Path(root) / f"{Path(encoder_name).name}-{digest}"
        self.dtype = dtype
        self.index = {}  # entry name -> shard file name
        self._readers = {}

    def load_index(self):
        self.index = {}
        for path in sorted(self.dir.glob("index-rank*.json")):
            shards = json.loads(path.read_text())
            for shard, names in shards.items():
                if (self.dir / shard).is_file():
                    self.index.update({name: shard for name in names})
        return self

    @staticmethod
    def entry_name(record):
        """A record's entry: a hash of its `audio_identity` (a short, fixed-length safetensors tensor name)."""
        return hashlib.sha1(record["audio_identity"].encode()).hexdigest()[:24]

    def __contains__(self, record):
        return self.entry_name(record) in self.index

    def size_bytes(self):
        return sum(p.stat().st_size for p in self.dir.glob("*.safetensors"))

    def fill(self, encode, dataset, rank=0, world=1, batch_size=8, batched=True, batch_seconds=None,
             max_padding=0.0):
        """Encodes this rank's share of `dataset` records that the cache lacks. `encode(list of audio) ->
        list of (T, D) tensors`. Batches as `fill_batches` cuts them: clips of similar duration, at most
        `batch_size` clips and `batch_seconds` padded audio seconds; `batched=False` (an encoder that takes no
        attention mask, whose output padding changes) batches only clips within `max_padding` (a fraction) of
        the batch's longest. Returns [(id, reason)] of clips that could not be read."""
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "key.json").write_text(json.dumps(self.key, indent=2))
        self.load_index()
        index_path = self.dir / f"index-rank{rank}.json"
        shards = json.loads(index_path.read_text()) if index_path.exists() else {}
        # one record per audio: ids naming the same file share its entry
        todo = list({self.entry_name(r): r for r in dataset.records[rank::world] if r not in self}.values())
        todo.sort(key=lambda r: r["duration"])  # similar lengths per batch: less padding
        failed, pending, pending_bytes = [], {}, 0

        def flush():
            nonlocal pending, pending_bytes
            if pending:
                name = f"rank{rank}-{len(shards):05d}.safetensors"
                save_file(pending, str(self.dir / (name + ".tmp")))
                os.replace(self.dir / (name + ".tmp"), self.dir / name)
                shards[name] = list(pending)
                index_path.with_suffix(".tmp").write_text(json.dumps(shards))
                os.replace(index_path.with_suffix(".tmp"), index_path)  # the index names only finished shards
            pending, pending_bytes = {}, 0

        groups = fill_batches([r["duration"] for r in todo], batch_size, batch_seconds,
                              None if batched else max_padding)
        for batch, audios, bad in clip_batches(todo, dataset.load, groups, f"caching encoder features (rank {rank})",
                                               disable=rank != 0):
            failed += [(record["id"], reason) for record, reason in bad]
            if not audios:
                continue
            for record, frames in zip(batch, encode(audios)):
                name = self.entry_name(record)
                pending[name] = frames.to(self.dtype).cpu().contiguous()
                pending_bytes += pending[name].numel() * 2
            if pending_bytes > self.SHARD_BYTES:
                flush()
        flush()
        return failed

    def read(self, record):
        from safetensors import safe_open

        name = self.entry_name(record)
        shard = self.index[name]
        if shard not in self._readers:  # memory-mapped; opened lazily, per DataLoader worker
            self._readers[shard] = safe_open(str(self.dir / shard), framework="pt")
        return self._readers[shard].get_tensor(name)


def fill_batches(durations, max_clips, max_seconds=None, max_padding=None, order=None):
    """Index batches of consecutive clips in `order` (by default `durations`' own, which should then be ascending):
    at most `max_clips` clips and `max_seconds` padded seconds (longest x clips) each; with `max_padding` (a
    fraction), only clips within that fraction of the batch's longest. An encoder without an attention mask
    (group-norm HuBERT-base) then sees at most that much zero padding, as it was pretrained on; 0 batches only
    clips of equal length. duration_batches packs its training batches with it too."""
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


class CachedFeatureDataset(RecordDataset):
    """Samples {id, frames (T, D) half precision, text, skipped} from a filled FeatureCache."""

    def __init__(self, dataset, cache):
        self.records = [r for r in dataset.records if r in cache]
        self.cache = cache

    def __getitem__(self, index):
        record = self.records[index]
        return dict(id=record["id"], frames=self.cache.read(record), text=record["text"], skipped=[])


def collate_frames(samples):
    """Cached encoder frames -> (encoder_frames (B, T, D) zero-padded, frame_lengths (B,))."""
    lengths = torch.tensor([len(s["frames"]) for s in samples])
    frames = torch.zeros(len(samples), int(lengths.max()), samples[0]["frames"].shape[1],
                         dtype=samples[0]["frames"].dtype)
    for i, s in enumerate(samples):
        frames[i, : len(s["frames"])] = s["frames"]
    return frames, lengths


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
