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


def whisper_basic_normalizer():
    """The same package's multilingual normalizer (lower case, symbols and bracketed text removed, any script):
    what Whisper's paper scores languages other than English with."""
    from whisper_normalizer.basic import BasicTextNormalizer

    return BasicTextNormalizer()


# name -> a function that makes the normalizer; "auto" (the default of every score this project reports)
# is "whisper" for English, "basic" for other languages (score_rule)
WER_NORMALIZERS = {"whisper": whisper_english_normalizer, "basic": whisper_basic_normalizer,
                   "simple": lambda: normalize_for_wer}
NORMALIZER_NAMES = {"whisper": "Whisper English", "basic": "Whisper basic, multilingual",
                    "simple": "lower case, no punctuation"}
ENGLISH = {"en", "eng", "english"}
# written without spaces between words: scored by characters (CER), as Whisper and FLEURS papers do
CHARACTER_LANGUAGES = {"zh", "zho", "chinese", "mandarin", "cantonese", "yue", "ja", "jpn", "japanese", "th",
                       "tha", "thai"}


def score_rule(normalizer="auto", language=None):
    """(normalizer name, unit) for a run's `--wer_normalizer` and language (a name or an ISO code; None is
    English, LibriSpeech's): "auto" picks Whisper's English normalizer for English and its basic one for other
    languages; the unit is "character" for languages written without spaces, "word" otherwise."""
    key = (language or "english").strip().lower()
    if normalizer == "auto":
        normalizer = "whisper" if key in ENGLISH else "basic"
    if normalizer not in WER_NORMALIZERS:
        raise ValueError(f"unknown WER normalizer {normalizer!r}: choose from {['auto', *WER_NORMALIZERS]}")
    return normalizer, "character" if key in CHARACTER_LANGUAGES else "word"


def word_error_rate(references, hypotheses, normalizer="auto", language=None):
    """Corpus WER (CER for languages in CHARACTER_LANGUAGES) after the normalizer score_rule picks: {wer,
    substitutions, deletions, insertions, words, normalizer, unit}; `words` counts characters where the unit is
    the character, and `wer` holds the CER then (one key, so that every consumer reads the same field).
    `language` is one for every clip, or a list of each clip's: each is then normalized and cut into words or
    characters by its own language's rule, and the errors of all are counted together (`unit` "mixed" where
    both kinds are in it; `normalizer` names each used)."""
    import jiwer

    languages = list(language) if isinstance(language, (list, tuple)) else [language] * len(references)
    rules = [score_rule(normalizer, lang) for lang in languages]
    normalizers = {name: WER_NORMALIZERS[name]() for name in sorted({name for name, _ in rules})}

    def tokens(text, rule):
        name, unit = rule
        text = " ".join(normalizers[name](text).split())
        return " ".join(text.replace(" ", "")) if unit == "character" else text  # no spaces in these scripts

    refs = [tokens(r, rule) for r, rule in zip(references, rules, strict=True)]
    hyps = [tokens(h, rule) for h, rule in zip(hypotheses, rules, strict=True)]
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
    units = {unit for _, unit in rules} or {score_rule(normalizer, None)[1]}
    counts["normalizer"] = " + ".join(normalizers) or score_rule(normalizer, None)[0]
    counts["unit"] = units.pop() if len(units) == 1 else "mixed"
    return counts


def scores_by_language(references, hypotheses, languages, normalizer="auto"):
    """{language: word_error_rate of its clips}, for a corpus whose clips speak several languages."""
    groups = {}
    for ref, hyp, language in zip(references, hypotheses, languages, strict=True):
        group = groups.setdefault(language, ([], []))
        group[0].append(ref)
        group[1].append(hyp)
    return {language: word_error_rate(refs, hyps, normalizer, language)
            for language, (refs, hyps) in sorted(groups.items(), key=lambda item: str(item[0]))}


def wer_line(scores, decoding=None):
    """The one way a WER (or CER) is reported: the figure, the counts, and what made it (decoding, normalizer)."""
    how = ", ".join(filter(None, [decoding, f"{scores['normalizer']} normalizer"]))
    name, units = {"character": ("CER", "characters"), "mixed": ("WER/CER", "words and characters (zh, ja, th)")
                   }.get(scores.get("unit"), ("WER", "words"))
    return (f"{name} {100 * scores['wer']:.2f}% ({how}): {scores['words']} {units}, {scores['substitutions']} "
            f"substitutions, {scores['deletions']} deletions, {scores['insertions']} insertions")
