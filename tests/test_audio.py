"""Reading, resampling and cutting audio (audio.py)."""
import os

import numpy as np
import pytest
import soundfile as sf
from conftest import CLIP, returns_within

import corpus
from audio import MIN_AUDIO_SAMPLES, DataError, audio_duration, quiet_cuts, read_audio
from corpus import DataReport, Record


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
@pytest.mark.parametrize("subtype", ["PCM_16", "DOUBLE"])
def test_resampling_and_stereo(tmp_path, clip, rate, subtype):
    import soxr
    resampled = soxr.resample(clip, 16000, rate)
    stereo = np.stack([resampled, 0.5 * resampled], axis=1)
    sf.write(tmp_path / "s.wav", stereo, rate, subtype=subtype)
    audio = read_audio(str(tmp_path / "s.wav"))
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - len(clip)) <= 2
    n = min(len(audio), len(clip))
    target = 0.75 * clip[:n]  # the mean of the two channels
    if rate >= 16000:  # 8 kHz loses the upper band; the rest must match closely
        assert np.corrcoef(audio[:n], target)[0, 1] > 0.99
    assert abs(audio_duration(str(tmp_path / "s.wav")) - len(clip) / 16000) < 1e-3


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
    with pytest.raises(DataError, match=reason) as e:
        read_audio(str(path))
    assert "bad.flac" in str(e.value)


def test_fifo_is_never_opened(tmp_path, clip):
    fifo = tmp_path / "pipe.flac"
    os.mkfifo(fifo)
    sf.write(tmp_path / "good.wav", clip, 16000)
    for read in (read_audio, audio_duration):
        with pytest.raises(DataError, match="pipe.flac: not a regular file"):
            returns_within(5, lambda: read(str(fifo)), fifo)
    records = [Record(id="pipe", text="a", path=str(fifo)),
               Record(id="good", text="b", path=str(tmp_path / "good.wav"))]
    report = DataReport("fifo")
    kept = returns_within(5, lambda: corpus.with_durations(records, report), fifo)
    assert [r.id for r in kept] == ["good"] and report.counts == {"not a regular file": 1}


def test_quiet_cuts_fall_in_the_pauses_and_tile_the_audio():
    rng = np.random.default_rng(0)
    rate, n = 16000, 16000 * 200
    audio = rng.normal(0, 0.1, n).astype(np.float32)  # "speech" everywhere but in the pauses
    pauses = [(s, s + rng.uniform(0.2, 0.6)) for s in np.arange(3.0, 199.0, rng.uniform(2.5, 4.5))]
    for start, end in pauses:
        audio[int(start * rate):int(end * rate)] = rng.normal(0, 1e-3, int(end * rate) - int(start * rate))
    cuts = quiet_cuts(audio, rate, max_seconds=30, search_seconds=5)
    assert cuts[0][0] == 0 and cuts[-1][1] == n and all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))  # a tiling
    assert all(end - start <= 30 * rate for start, end in cuts) and len(cuts) == 8
    assert all(end - start >= 25 * rate for start, end in cuts[:-1])  # each cut in the last 5 s of its window
    for _, end in cuts[:-1]:
        assert any(start * rate + 200 <= end <= stop * rate - 200 for start, stop in pauses), end / rate

    # a remainder shorter than the encoder's minimum: the last cut moves earlier, never a window under it
    short = quiet_cuts(audio[:30 * rate + 10], rate, max_seconds=30)
    assert len(short) == 2 and short[-1][1] - short[-1][0] >= MIN_AUDIO_SAMPLES and short[-1][1] == 30 * rate + 10
    assert quiet_cuts(audio[:30 * rate], rate, max_seconds=30) == [(0, 30 * rate)]  # not over: not cut
    quiet = np.zeros(70 * rate, np.float32)  # all silence: cut in the middle of each search stretch
    assert quiet_cuts(quiet, rate, max_seconds=30, search_seconds=5) == [
        (0, 27.5 * rate), (27.5 * rate, 55 * rate), (55 * rate, 70 * rate)]


def test_channels_that_cancel_out_and_a_truncated_wav_are_refused(tmp_path, clip):
    sf.write(tmp_path / "inverted.wav", np.stack([clip, -clip], axis=1), 16000)  # mixed, it would be silence
    with pytest.raises(DataError, match="inverted.wav: its 2 channels cancel out when mixed to mono"):
        read_audio(str(tmp_path / "inverted.wav"))
    sf.write(tmp_path / "full.wav", clip, 16000, subtype="PCM_16")
    data = (tmp_path / "full.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[:len(data) // 2])  # a copy that stopped half way
    for read in (read_audio, audio_duration):  # read at its surviving length, it would train on half the words
        with pytest.raises(DataError, match="cut.wav: truncated"):
            read(str(tmp_path / "cut.wav"))
