"""
The processor: what turns raw inputs into SlamASR's inputs, in one object, as Hugging Face's Wav2Vec2Processor,
WhisperProcessor and Ultravox's UltravoxProcessor do: the prompt template and its exact token ids, audio to
the encoder's input (padded `input_values`, or Whisper's log-mel `input_features`), transcripts to labels, and
the batch the collator returns.

The LLM reads [prefix ids] [speech embeddings] [suffix ids] [transcript ids] [EOS]. Each side of the speech is
tokenized as the tokenizer tokenizes text: the prefix with the tokenizer's own special tokens (BOS for Llama),
and the suffix *together with* the transcript, so that the transcript gets exactly the ids it has in the
rendered conversation. Tokenized alone, "he hoped" starts with SentencePiece's "▁he"; after TinyLlama's
"<|assistant|>\\n" the same word is "he", and that is what the frozen LLM expects to write.

The prompt's ids are saved with the adapter (prompt_ids.json) and used again at inference, so a tokenizer
that splits the template differently in a later library version cannot change what a trained adapter sees.
"""

import json
import logging
import os

import torch

logger = logging.getLogger(__name__)

SPEECH_PLACEHOLDER = "<speech>"
PROMPT_IDS_NAME = "prompt_ids.json"
SYSTEM_PROMPT = "You are a speech recognizer. Reply with the exact transcript of the audio."
LANGUAGE_SLOT = "{language}"  # a prompt template's place for the run's --language
USER_PROMPT = f"Transcribe this audio:\n{SPEECH_PLACEHOLDER}"  # the speech on a line of its own: no lone space
USER_PROMPT_IN_LANGUAGE = f"Transcribe this audio in {LANGUAGE_SLOT}:\n{SPEECH_PLACEHOLDER}"
# Transcript beginnings used to find how much of the suffix tokenizes the same whatever follows it: a suffix
# ending in a space ("ASSISTANT: ") loses its last token to the transcript's first word ("▁he").
_PROBE_STARTS = ("a", "the", "I", "1", "hello", "'tis")


def write_text_atomic(path, text):
    """Writes `text` to a temporary name, flushes it to disk, then renames it over `path`: a full disk or a kill
    raises or leaves the old file, never an empty or torn one."""
    try:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.lexists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise
    os.replace(path + ".tmp", path)


def chat_prompt_template(tokenizer, language=None):
    """The prompt template as the LLM tokenizer's own chat template renders a system turn and a user turn holding
    the speech, generation prompt on: each chat LLM gets its own format (TinyLlama's is DEFAULT_PROMPT_TEMPLATE
    in model.py). With a `language`, the user turn names it through LANGUAGE_SLOT, kept in the template (the
    saved template is one for every language: transcribe.py --language fills in another)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the LLM's tokenizer ({getattr(tokenizer, 'name_or_path', '')!r}) has no chat template "
                         f"(not a chat model?): pass --prompt_template with one {SPEECH_PLACEHOLDER}")
    from jinja2 import TemplateError, TemplateSyntaxError

    source = f"the chat template of the LLM {getattr(tokenizer, 'name_or_path', '') or '(unnamed)'} (its " \
             "chat_template.jinja or tokenizer_config.json)"
    user = USER_PROMPT if language is None else USER_PROMPT_IN_LANGUAGE
    turns = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    except TemplateSyntaxError as e:
        raise ValueError(f"{source} is not a valid Jinja template ({e}, line {e.lineno}): fix it, or pass "
                         f"--prompt_template with one {SPEECH_PLACEHOLDER}") from None
    except TemplateError:  # templates without a system role (Gemma's) refuse it: the instruction goes first
        turns = [{"role": "user", "content": f"{SYSTEM_PROMPT}\n{user}"}]
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    if text.count(SPEECH_PLACEHOLDER) != 1:
        raise ValueError(f"{source} renders {text.count(SPEECH_PLACEHOLDER)} {SPEECH_PLACEHOLDER} placeholders where "
                         f"the user turn holds one: fix the template, or pass --prompt_template with one")
    if tokenizer.bos_token and text.startswith(tokenizer.bos_token):
        text = text[len(tokenizer.bos_token):]  # the tokenizer adds its BOS itself (Llama 3's template writes it)
    return text


def _common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


class SlamASRProcessor:
    """Feature extractor + tokenizer + prompt template. `prompt_ids` ({"prefix": [...], "suffix": [...]}, as
    saved with an adapter) replaces the ids computed from the template, with a warning where they differ."""

    def __init__(self, feature_extractor, tokenizer, prompt_template, prompt_ids=None):
        self.feature_extractor = feature_extractor
        # the audio's key in the batch, the feature extractor's own name for it: "input_values" (the wav2vec2
        # family's waveform) or "input_features" (Whisper's log-mel)
        self.input_name = feature_extractor.model_input_names[0]
        # Whisper's encoder takes exactly one 30 s window (n_samples): shorter clips are padded to it, longer
        # ones cannot be taken (its feature extractor would silently cut them)
        self.max_samples = getattr(feature_extractor, "n_samples", None)
        self.tokenizer = tokenizer
        self.prompt_template = prompt_template
        self.prefix_text, self.suffix_text = prompt_template.split(SPEECH_PLACEHOLDER)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # a transcript holding one of these would put, e.g., an EOS target in the middle of the sentence
        self.special_tokens = sorted({t for t in tokenizer.all_special_tokens if t})

        computed = self.tokenize_prompt()
        self.tokenizer_suffix_ids = computed["suffix"]  # what transcripts are tokenized after, in transcript_ids
        if prompt_ids is not None and prompt_ids != computed:
            logger.warning(
                "this tokenizer turns the prompt template into other ids than the ones saved with the adapter "
                f"(saved {prompt_ids}, now {computed}); using the saved ones, which the adapter was trained with")
        self.prompt_ids = prompt_ids if prompt_ids is not None else computed
        if self.prefix_text.endswith((" ", "\t")):
            logger.warning(f"prompt_template has whitespace right before {SPEECH_PLACEHOLDER}: most tokenizers "
                           f"make it a token of its own in front of the speech (ids {self.prompt_ids['prefix'][-2:]}"
                           "); end that text with a newline, or with no space, instead")

    @property
    def prefix_ids(self):
        return self.prompt_ids["prefix"]

    @property
    def suffix_ids(self):
        return self.prompt_ids["suffix"]

    # --- text ------------------------------------------------------------------------------------------------

    def tokenize_prompt(self):
        """{"prefix": ids, "suffix": ids} of the template, as this tokenizer makes them."""
        tok = self.tokenizer
        plain = tok(self.prefix_text, add_special_tokens=False)["input_ids"]
        prefix = tok(self.prefix_text)["input_ids"]  # the tokenizer's own rule for the start of a text (BOS)
        if prefix and prefix[-1] == self.eos_id and (not plain or plain[-1] != self.eos_id):
            prefix = prefix[:-1]  # tokenizers set to append EOS to every text: not in the middle of a prompt
        suffix = tok(self.suffix_text, add_special_tokens=False)["input_ids"]
        for start in _PROBE_STARTS:
            suffix = _common_prefix(suffix, tok(self.suffix_text + start, add_special_tokens=False)["input_ids"])
        return {"prefix": list(prefix), "suffix": list(suffix)}

    def special_token_in(self, text):
        """The first of the LLM's special tokens written out in `text`, or None."""
        return next((t for t in self.special_tokens if t in text), None)

    def transcript_ids(self, text):
        """The ids of `text` as the LLM reads it right after the prompt (EOS not included)."""
        special = self.special_token_in(text)
        if special is not None:
            raise ValueError(f"transcript {text!r} contains the LLM's special token {special!r}, which would be "
                             "trained as that token (an EOS mid-sentence, say); remove it from the data")
        suffix = self.tokenizer_suffix_ids
        joint = self.tokenizer(self.suffix_text + text, add_special_tokens=False)["input_ids"]
        if joint[:len(suffix)] != suffix:
            raise ValueError(f"transcript {text!r} changes how the end of the prompt template tokenizes "
                             f"({joint[:len(suffix)]} instead of {suffix}); end the template with a newline")
        return joint[len(suffix):]

    def labels(self, texts, max_target_tokens=None):
        """Transcripts -> (labels (B, T): transcript ids + EOS, padded with -100; number truncated)."""
        rows, truncated = [], 0
        for text in texts:
            ids = self.transcript_ids(text)
            if max_target_tokens is not None and len(ids) + 1 > max_target_tokens:
                ids, truncated = ids[: max_target_tokens - 1], truncated + 1
            rows.append(ids + [self.eos_id])  # the EOS is a target: without it the model never learns to stop
        labels = torch.full((len(rows), max(len(r) for r in rows)), -100, dtype=torch.long)
        for i, row in enumerate(rows):
            labels[i, : len(row)] = torch.tensor(row)
        return labels, truncated

    # --- audio -----------------------------------------------------------------------------------------------

    @property
    def sampling_rate(self):
        return self.feature_extractor.sampling_rate

    def audio(self, audios):
        """List of 1-D float arrays at the encoder's rate -> (features, audio_lengths (B,) samples): features are
        input_values (B, N) zero-padded to the longest clip, or Whisper's input_features (B, n_mels, 3000), the
        log-mel of each clip padded to the 30 s window."""
        audios = list(audios)
        audio_lengths = torch.tensor([len(a) for a in audios])
        if self.max_samples is not None and int(audio_lengths.max()) > self.max_samples:
            too_long = [f"{n / self.sampling_rate:.1f} s" for n in audio_lengths.tolist() if n > self.max_samples]
            raise ValueError(
                f"clips of {', '.join(too_long)} are longer than the {self.max_samples / self.sampling_rate:g} s "
                f"window of this encoder ({type(self.feature_extractor).__name__}: Whisper's encoder takes at most "
                f"{self.max_samples / self.sampling_rate:g} s). Leave them out with --max_duration "
                f"{self.max_samples / self.sampling_rate:g} (finetune.py, transcribe.py), or split them first.")
        # The attention mask is always asked for so that normalization sees each clip's own samples, never the
        # padding; whether the encoder itself gets a mask is the model's business (see backbones.encoder_kind).
        features = self.feature_extractor(
            audios, sampling_rate=self.sampling_rate, padding="max_length" if self.max_samples else True,
            return_attention_mask=True, return_tensors="pt")
        return features[self.input_name].float(), audio_lengths

    # --- the batch -------------------------------------------------------------------------------------------

    def __call__(self, audios=None, texts=None, max_target_tokens=None):
        """Clips and/or transcripts -> a BatchFeature of input_values (B, N) (or Whisper's input_features),
        audio_lengths (B,) and labels (B, T): what SlamASR.forward and .generate take."""
        from transformers import BatchFeature

        batch = {}
        if audios is not None:
            batch[self.input_name], batch["audio_lengths"] = self.audio(audios)
        if texts is not None:
            batch["labels"], _ = self.labels(texts, max_target_tokens)
        return BatchFeature(batch)

    # --- save / load -----------------------------------------------------------------------------------------

    def save_pretrained(self, directory):
        """Writes prompt_ids.json: the template, its ids, and what made them."""
        import transformers

        record = {"prompt_template": self.prompt_template, **self.prompt_ids,
                  "tokenizer": getattr(self.tokenizer, "name_or_path", ""),
                  "transformers_version": transformers.__version__}
        write_text_atomic(os.path.join(directory, PROMPT_IDS_NAME), json.dumps(record, indent=2) + "\n")

    @staticmethod
    def read_prompt_ids(directory, prompt_template):
        """The ids saved in `directory` for `prompt_template`, or None where none were saved."""
        path = os.path.join(directory, PROMPT_IDS_NAME)
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
            ids = {"prefix": [int(i) for i in record["prefix"]], "suffix": [int(i) for i in record["suffix"]]}
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a valid prompt id file ({e!r}); delete it to recompute the ids from "
                             "the template") from None
        if record.get("prompt_template") != prompt_template:
            raise ValueError(f"{path} holds the ids of another prompt template ({record.get('prompt_template')!r}) "
                             f"than the adapter's config ({prompt_template!r})")
        return ids
