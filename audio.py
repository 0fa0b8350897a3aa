"""
Audio: the sample rate and the shortest clip the encoders take, reading any file (or bytes) to mono float32 at
that rate, durations from the header alone, and the quiet points where a long recording is cut into windows.
Decoding is soundfile's (libsndfile), resampling soxr's: no torchaudio, no ffmpeg.
"""

import io
import os
import stat
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000  # every clip is resampled to the encoder's rate: this for HuBERT, WavLM, wav2vec2, Whisper
MIN_AUDIO_SAMPLES = 400  # HuBERT's conv front end sees 400 samples (25 ms) per frame: shorter clips give none
CUT_SEARCH_SECONDS = 5.0  # a long recording is cut at the quietest point in this last stretch of each window


class DataError(ValueError):
    """A clip or an index entry that cannot be used, with the file and the reason."""


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


def _open(source):
    """(what to hand soundfile, the name errors use): a path (checked first, see file_problem) or bytes."""
    if isinstance(source, (str, Path)):
        problem = file_problem(source)
        if problem:
            raise DataError(f"{source}: {problem}")
        return source, source
    return io.BytesIO(source), "<bytes>"


def read_audio(source, sampling_rate=SAMPLE_RATE):
    """A file path or bytes -> 1-D float32 at `sampling_rate` (mixed to mono, resampled).
    Raises DataError for missing, non-regular, unreadable, empty, too short or non-finite audio."""
    handle, name = _open(source)
    try:
        data, rate = sf.read(handle, dtype="float32", always_2d=True)  # (samples, channels), ints scaled to [-1, 1]
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


def audio_duration(source):
    """Seconds, from the file header alone (no decoding). Raises DataError naming the file when it cannot."""
    handle, name = _open(source)
    try:
        info = sf.info(handle)
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as e:
        raise DataError(f"{name}: cannot read audio ({e})") from None
    return info.frames / info.samplerate


def file_identity(path):
    """What the feature cache knows a file's audio by: resolved path + size + mtime_ns. A stat is free at
    indexing, where a content hash would read all the audio (tens of GB) at every start; a rewritten file gets
    a new identity."""
    st = os.stat(path)
    return f"file:{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"


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
