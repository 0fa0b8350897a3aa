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


@pytest.mark.parametrize("language, rule", [
    (None, ("whisper", "word")), ("English", ("whisper", "word")), ("en", ("whisper", "word")),
    ("French", ("basic", "word")), ("zh", ("basic", "character")), ("Japanese", ("basic", "character")),
    ("th", ("basic", "character"))])
def test_the_score_follows_the_language(language, rule):
    assert text.score_rule("auto", language) == rule
    assert text.score_rule("simple", language)[0] == "simple"  # a named normalizer is kept


def test_languages_without_spaces_are_scored_by_characters():
    scores = text.word_error_rate(["你好，世界。"], ["你好 世"], language="zh")
    assert (scores["wer"], scores["words"], scores["deletions"], scores["unit"]) == (0.25, 4, 1, "character")
    assert text.wer_line(scores).startswith("CER 25.00% (basic normalizer): 4 characters")
    # scored by words, the punctuation-made "words" decide: 世界 against 世, one of two wrong
    assert text.word_error_rate(["你好，世界。"], ["你好 世"], "basic")["wer"] == 0.5


def test_other_languages_keep_their_letters_and_lose_their_punctuation():
    scores = text.word_error_rate(["Ça va, à demain !"], ["ça va à demain"], language="French")
    assert (scores["wer"], scores["normalizer"]) == (0.0, "basic")
    with pytest.raises(ValueError, match="unknown WER normalizer 'nope'"):
        text.word_error_rate(["a"], ["a"], "nope")


def test_a_corpus_of_several_languages_scores_each_clip_by_its_own_rule():
    refs, hyps = ["the cat sat", "我爱你"], ["the cat sat down", "我爱"]
    word_error_rate, scores_by_language, wer_line = text.word_error_rate, text.scores_by_language, text.wer_line
    mixed = word_error_rate(refs, hyps, language=["en", "zh"])
    assert (mixed["words"], mixed["insertions"], mixed["deletions"]) == (3 + 3, 1, 1)  # words + characters
    assert mixed["unit"] == "mixed" and mixed["normalizer"] == "basic + whisper"
    assert "WER/CER" in wer_line(mixed)
    by = scores_by_language(refs, hyps, ["en", "zh"])
    assert by["en"]["wer"] == pytest.approx(1 / 3) and by["zh"]["wer"] == pytest.approx(1 / 3)
    assert by["zh"]["unit"] == "character"
    assert word_error_rate(refs[:1], hyps[:1], language=["en"]) == word_error_rate(refs[:1], hyps[:1], language="en")
