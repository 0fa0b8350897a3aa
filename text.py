"""
Text: how transcripts are normalized into training targets, the WER normalizers every reported figure names,
the WER itself, and the one line that reports it.
"""

import re
import unicodedata


TRANSCRIPT_CASES = ("auto", "keep", "lower", "upper")


def normalize_transcript(text, case="auto"):
    """Unicode NFKC, control characters dropped, whitespace collapsed, then the case: `auto` lowers a transcript
    written all in capitals (LibriSpeech's: they carry no case to learn, and a chat LLM writes lower case far more
    often) and keeps any other as written (Common Voice's, FLEURS' raw text: case and punctuation are part of the
    target); `keep`, `lower` and `upper` do what they say."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(c if unicodedata.category(c)[0] != "C" else " " for c in text)
    text = " ".join(text.split())
    if case == "lower" or case == "auto" and text.isupper():
        return text.lower()
    return text.upper() if case == "upper" else text


def normalize_for_wer(text):
    """The training normalization, lower-cased, with punctuation other than apostrophes removed."""
    text = normalize_transcript(text, "lower")
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


def wer_line(scores, decoding=None):
    """The one way a WER is reported: the figure, the counts, and what made it (decoding, normalizer)."""
    how = ", ".join(filter(None, [decoding, f"{scores['normalizer']} normalizer"]))
    return (f"WER {100 * scores['wer']:.2f}% ({how}): {scores['words']} words, {scores['substitutions']} "
            f"substitutions, {scores['deletions']} deletions, {scores['insertions']} insertions")
