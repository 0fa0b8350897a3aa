"""The prompt, labels and the batch (processor.py)."""

import pytest
import torch
from conftest import ROOT, make_model, overfit, read_split, tiny_processor

from model import DEFAULT_PROMPT_TEMPLATE, SlamASR, SlamASRConfig
from processor import chat_prompt_template


def test_labels_cover_transcript_and_eos_only(train_clips):
    audios, texts = train_clips
    model = make_model()
    tok = model.tokenizer
    batch_texts = ["the ship", "a much longer transcript than the first one"]
    input_values, audio_lengths = model.processor.audio(audios[:2])
    labels, _ = model.processor.labels(batch_texts)
    frames, frame_lengths = model.encode(input_values, audio_lengths)
    embeds, speech_lengths = model.adapt(frames, frame_lengths)
    spliced = model.splice(embeds, speech_lengths, labels)
    attention_mask, targets = spliced.attention_mask, spliced.targets
    P, Q = len(model.prefix_ids), len(model.suffix_ids)
    for i, text in enumerate(batch_texts):
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        start = P + speech_lengths[i].item() + Q
        assert targets[i, start:start + len(ids)].tolist() == ids
        assert (targets[i, :start] == -100).all() and (targets[i, start + len(ids):] == -100).all()
        assert attention_mask[i].sum().item() == start + len(ids)  # padding is masked and never a target
    assert (targets[attention_mask == 0] == -100).all()


def test_truncation_keeps_eos():
    processor = tiny_processor()
    tok = processor.tokenizer
    labels, truncated = processor.labels(["the ship sailed at dawn", "a"], max_target_tokens=3)
    assert truncated == 1
    assert labels.shape[1] == 3 and labels[0, -1].item() == tok.eos_token_id


QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    """A tiny random Qwen2ForCausalLM with a ChatML tokenizer (no BOS, EOS <|im_end|>), saved as the hub has it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from backbones import _TINY_TOKENIZER_TEXT

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_TINY_TOKENIZER_TEXT.split("\n"), trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=QWEN2_CHAT_TEMPLATE)
    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.1, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None))
    path = tmp_path_factory.mktemp("qwen2")
    llm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_the_prompt_comes_from_the_llms_chat_template(qwen2_dir, tmp_path):
    from transformers import AutoTokenizer

    llama2 = AutoTokenizer.from_pretrained(ROOT / "tests" / "fixtures" / "llama2-tokenizer")
    assert chat_prompt_template(llama2) == DEFAULT_PROMPT_TEMPLATE  # TinyLlama's, as today's default

    model = SlamASR.from_config(SlamASRConfig(encoder="tiny", llm=qwen2_dir, adapter_hidden=256))
    assert model.config.prompt_template == (
        "<|im_start|>system\nYou are a speech recognizer. Reply with the exact transcript of the audio.<|im_end|>\n"
        "<|im_start|>user\nTranscribe this audio:\n<speech><|im_end|>\n<|im_start|>assistant\n")
    labels, _ = model.processor.labels(["the ship"])
    assert labels[0, -1].item() == model.tokenizer.convert_tokens_to_ids("<|im_end|>")  # its end of turn is EOS
    assert model.prefix_ids[0].item() == model.tokenizer.convert_tokens_to_ids("<|im_start|>")  # no BOS in Qwen2

    audios, texts = read_split("train-clean-100")
    losses = overfit(model, audios[:2], texts[:2], steps=40)
    assert losses[-1] < 0.5 * losses[0]
    model.save_adapter(tmp_path)
    loaded = SlamASR.load_adapter(tmp_path)  # the rendered template was saved, written out
    assert loaded.config.prompt_template == model.config.prompt_template
    assert loaded.transcribe(audios[:2], max_new_tokens=12) == model.transcribe(audios[:2], max_new_tokens=12)


def test_an_llm_without_a_chat_template_needs_a_prompt_template(qwen2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen2_dir)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template.*--prompt_template"):
        chat_prompt_template(tokenizer)


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}{{ m['content'] }}{{ m['content'] }}{% endfor %}", "renders 2 <speech> placeholders"),
    ("{% for m in messages %}{{ m['role'] }}{% endfor %}", "renders 0 <speech> placeholders"),
    ("{% for m in messages %}{{ m['content'] }", "is not a valid Jinja template"),
])
def test_a_chat_template_that_cannot_give_the_prompt_is_named(template, message):
    from backbones import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = template
    with pytest.raises(ValueError, match=f"the chat template of the LLM .*{message}"):
        chat_prompt_template(tokenizer)
