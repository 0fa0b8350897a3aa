"""
Audio: the sample rate and the shortest clip the encoders take, reading any file (or bytes) to mono float32 at
that rate, durations from the header alone, and the quiet points where a long recording is cut into windows.
Decoding is soundfile's (libsndfile), resampling soxr's: no torchaudio, no ffmpeg.
"""

import io
import os
import re
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


def _header(handle, name):
    """soundfile's header of an opened source, refusing a file cut short after its header was written (libsndfile
    reads such a WAV to its last whole frame without a word, and its transcript would then be trained on a part)."""
    try:
        info = sf.info(handle)
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as e:
        raise DataError(f"{name}: cannot read audio ({e})") from None
    cut = re.search(r"^data : (\d+) \(should be (\d+)\)", info.extra_info, re.M)
    if cut and int(cut.group(2)) < int(cut.group(1)):
        raise DataError(f"{name}: truncated (its header announces {cut.group(1)} bytes of audio, the file holds "
                        f"{cut.group(2)})")
    return info


def read_audio(source, sampling_rate=SAMPLE_RATE):
    """A file path or bytes -> 1-D float32 at `sampling_rate` (mixed to mono, resampled).
    Raises DataError for missing, non-regular, unreadable, truncated, empty, too short or non-finite audio, and for
    channels that cancel out when mixed."""
    handle, name = _open(source)
    _header(handle, name)
    if isinstance(handle, io.BytesIO):
        handle.seek(0)
    try:
        data, rate = sf.read(handle, dtype="float32", always_2d=True)  # (samples, channels), ints scaled to [-1, 1]
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as e:
        raise DataError(f"{name}: cannot read audio ({e})") from None
    audio = data.mean(axis=1)  # (samples,)
    if not np.isfinite(audio).all():
        raise DataError(f"{name}: audio contains NaN or Inf samples")
    loudest = float(np.sqrt((data.astype(np.float64) ** 2).mean(axis=0)).max()) if len(data) else 0.0
    if data.shape[1] > 1 and loudest > 1e-4 and np.sqrt((audio.astype(np.float64) ** 2).mean()) < 0.01 * loudest:
        raise DataError(f"{name}: its {data.shape[1]} channels cancel out when mixed to mono (one is another "
                        "inverted); mix it down to mono yourself")
    if rate != sampling_rate and len(audio):
        audio = soxr.resample(audio, rate, sampling_rate).astype(np.float32)
    if len(audio) < MIN_AUDIO_SAMPLES * sampling_rate // SAMPLE_RATE:
        raise DataError(f"{name}: audio too short ({len(audio)} samples at {sampling_rate} Hz; the encoder needs "
                        f"at least {MIN_AUDIO_SAMPLES * sampling_rate // SAMPLE_RATE})")
    return audio


def audio_duration(source):
    """Seconds, from the file header alone (no decoding). Raises DataError naming the file when it cannot."""
    info = _header(*_open(source))
    return info.frames / info.samplerate


IDENTITY_BYTES = 64 * 1024  # the head and tail of a file that its identity hashes


def file_identity(path):
    """What the feature cache knows a file's audio by: resolved path + size + mtime_ns + a hash of its first and
    last 64 KB. A rewritten file gets a new identity even where its size and mtime were restored; a hash of all
    of it would read every clip (tens of GB) at every start, this reads the part the header read touches
    anyway, and the end."""
    import hashlib

    st = os.stat(path)
    with open(path, "rb") as f:
        digest = hashlib.sha1(f.read(IDENTITY_BYTES))
        if st.st_size > 2 * IDENTITY_BYTES:
            f.seek(-IDENTITY_BYTES, os.SEEK_END)
        digest.update(f.read(IDENTITY_BYTES))
    return f"file:{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}:{digest.hexdigest()[:16]}"


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
