"""Transcript normalization and WER (text.py)."""

import pytest

import text


def test_normalizer_shared_by_targets_and_wer():
    assert text.normalize_transcript("  HELLO,\tWorld\u0007 ", "lower") == "hello, world"
    assert text.normalize_transcript("MIXED Case", "keep") == "MIXED Case"
    assert text.normalize_transcript("Mixed Case, kept.") == "Mixed Case, kept."  # auto: only capitals lowered
    assert text.normalize_transcript("ALL CAPITALS") == "all capitals"
    assert text.normalize_transcript("Mixed", "upper") == "MIXED" and text.normalize_transcript("Mixed", "lower") == "mixed"
    assert text.normalize_for_wer("Don't  STOP, now!") == "don't stop now"
    for normalizer in text.WER_NORMALIZERS:
        scores = text.word_error_rate(["the cat sat", "a b", "   "], ["the cat sat down", "a", "x y"], normalizer)
        assert (scores["substitutions"], scores["deletions"], scores["insertions"], scores["words"]) == (0, 1, 3, 5)
        assert scores["wer"] == pytest.approx(4 / 5) and scores["normalizer"] == normalizer
    # Whisper's English normalizer: what published figures use (spellings, numbers, contractions)
    whisper = text.word_error_rate(["Mister Smith isn't twenty five"], ["mr smith is not 25"])
    assert whisper["wer"] == 0 and whisper["normalizer"] == "whisper"
    assert text.word_error_rate(["Mister Smith isn't twenty five"], ["mr smith is not 25"], "simple")["wer"] > 0.5
    with pytest.raises(ValueError, match="unknown WER normalizer"):
        text.word_error_rate(["a"], ["a"], "whisperr")
