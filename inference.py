"""
Audio to text: the one inference loop, used by `SlamASR.transcribe`, the trainer's eval WER and transcribe.py.
Clips in, one `Transcript` per clip out, in input order; batched by length (longest first, so that a batch holds
similar lengths); an input that cannot be read is a Transcript with an error, never a stopped run; each result
is handed to `on_result` as soon as it is done, so that a caller can write it out incrementally.

An input longer than `chunk_seconds` is transcribed as windows cut at quiet points (audio.quiet_cuts) and its
text is theirs joined in order. Clips and windows go through one queue: a long input waits in it with the
length of its shortest full window (chunk_seconds - CUT_SEARCH_SECONDS) and is read and cut only when that
comes up; its windows are then queued by their own lengths. So a long file is read once, and its audio is held
only until its windows are decoded (mostly by the next batches; the last window, often short, waits for the
clips of its length), never every long file at once.
"""

import heapq
import itertools
from dataclasses import dataclass
from typing import Callable

from tqdm.auto import tqdm

from audio import CUT_SEARCH_SECONDS, DataError, quiet_cuts


@dataclass(frozen=True)
class Clip:
    """One input: its length in seconds (what it is batched by) and how to read it (`load() -> 1-D float32` at
    the model's rate, raising DataError), or the reason it cannot be transcribed, known before reading it."""

    seconds: float = 0.0
    load: Callable | None = None
    error: str | None = None
    language: str | None = None  # the clip's own, named by its prompt; None: the model's


@dataclass(frozen=True)
class Transcript:
    text: str | None = None  # None where the input could not be transcribed
    error: str | None = None
    cuts: tuple = ()  # seconds at which a long input was cut into windows


@dataclass
class _Pending:
    """A long input between its reading and its last window's decoding."""

    texts: list
    cuts: tuple


def transcribe(model, clips, batch_size=8, chunk_seconds=None, on_result=None, before_batch=None,
               desc="transcribing", disable_progress=False):
    """[Transcript] of `clips` (inference.Clip), in their order. `chunk_seconds` (None: never) cuts longer inputs
    into windows; `on_result(index, transcript)` is called as each input is done; `before_batch()` before each
    batch is gathered (the trainer's stop check, which may raise)."""
    results = [None] * len(clips)

    def finish(index, transcript):
        results[index] = transcript
        if on_result is not None:
            on_result(index, transcript)
        bar.update(1)

    def is_long(clip):
        return chunk_seconds is not None and clip.seconds > chunk_seconds

    waits_as = None if chunk_seconds is None else max(chunk_seconds - CUT_SEARCH_SECONDS, 0)
    # (-seconds, order, (input index, window index or None, the window's audio or None)); the order number keeps
    # ties in input order
    queue = [(-(waits_as if is_long(c) else c.seconds), i, (i, None, None)) for i, c in enumerate(clips) if not c.error]
    heapq.heapify(queue)
    order = itertools.count(len(clips))
    pending = {}  # input index -> _Pending, for long inputs
    with tqdm(total=len(clips), desc=desc, unit="input", disable=disable_progress or not clips) as bar:
        for i, clip in enumerate(clips):
            if clip.error:
                finish(i, Transcript(error=clip.error))
        while queue:
            if before_batch is not None:
                before_batch()
            items, audios, languages = [], [], []
            while queue and len(items) < batch_size:
                i, window, samples = heapq.heappop(queue)[2]
                if window is None:
                    try:
                        samples = clips[i].load()
                    except DataError as e:
                        finish(i, Transcript(error=str(e)))
                        continue
                    if is_long(clips[i]):  # its turn: queue its windows
                        rate = model.sampling_rate
                        cuts = quiet_cuts(samples, rate, chunk_seconds)
                        pending[i] = _Pending([None] * len(cuts), tuple(round(end / rate, 2) for _, end in cuts[:-1]))
                        for k, (start, end) in enumerate(cuts):
                            # views of the file's audio, freed with the full windows in the next batches; the last
                            # is copied, as it may wait for the short clips and should not keep the whole file
                            window_audio = samples[start:end] if k < len(cuts) - 1 else samples[start:end].copy()
                            heapq.heappush(queue, (-(end - start) / rate, next(order), (i, k, window_audio)))
                        del samples  # from here only its windows hold it
                        continue
                items.append((i, window))
                audios.append(samples)
                languages.append(clips[i].language)
            if not audios:
                continue
            texts = model.generate(**model.processor(audios=audios, languages=languages).to(model.device))
            for (i, window), text in zip(items, texts):
                if window is None:
                    finish(i, Transcript(text=text))
                    continue
                long = pending[i]
                long.texts[window] = text
                if all(t is not None for t in long.texts):
                    del pending[i]
                    finish(i, Transcript(text=" ".join(t for t in long.texts if t), cuts=long.cuts))  # silence: ""
    return results
