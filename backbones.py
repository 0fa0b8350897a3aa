"""
The frozen backbones: loading them by hub name or local folder in the dtype asked for, and the tiny random
ones (a HubertModel, a LlamaForCausalLM, a BPE tokenizer trained offline) that tests, the demo and the
benchmark use without a network.
"""

import logging

import torch

logger = logging.getLogger(__name__)
TINY = "tiny"  # name of the built-in tiny random backbones, usable for `encoder` and/or `llm`


def load_backbones(config, torch_dtype=None, trust_remote_code=False):
    """(encoder, llm, tokenizer, feature_extractor) for the names in `config`; "tiny" builds them offline.
    Both backbones run in `torch_dtype`, float32 when None: whatever dtype a checkpoint was saved in
    (TinyLlama's hub weights are bfloat16), a float32 run gets float32 backbones."""
    from transformers import AutoFeatureExtractor, AutoModel, AutoModelForCausalLM, AutoTokenizer

    tiny = tiny_backbones() if TINY in (config.encoder, config.llm) else None

    def load(what, name, fn, **kwargs):
        try:
            return fn(name, trust_remote_code=trust_remote_code, **kwargs)
        except OSError as e:
            raise OSError(
                f"could not load the {what} {name!r} ({e}). If this machine is offline, download it where there is "
                f"a network (`hf download {name}`) and pass its local folder instead, or point HF_HOME at a cache "
                "that holds it."
            ) from None

    if config.encoder == TINY:
        encoder, feature_extractor = tiny[0], tiny[3]
    else:
        encoder = load("speech encoder", config.encoder, AutoModel.from_pretrained, dtype=torch_dtype or torch.float32)
        feature_extractor = load("feature extractor", config.encoder, AutoFeatureExtractor.from_pretrained)
    if config.llm == TINY:
        llm, tokenizer = tiny[1], tiny[2]
    else:
        llm = load("LLM", config.llm, AutoModelForCausalLM.from_pretrained, dtype=torch_dtype or torch.float32)
        tokenizer = load("tokenizer", config.llm, AutoTokenizer.from_pretrained)
    # transformers 5 reads dtype=None as "auto", the checkpoint's own dtype: always name the one wanted
    torch_dtype = torch_dtype or torch.float32
    encoder, llm = encoder.to(torch_dtype), llm.to(torch_dtype)
    logger.info(f"speech encoder {config.encoder!r} runs in {torch_dtype}, LLM {config.llm!r} in {torch_dtype}; "
                "the adapter trains in float32")
    return encoder, llm, tokenizer, feature_extractor


# TinyLlama-1.1B-Chat-v1.0's chat template (tokenizer_config.json), so that the tiny LLM chats like it
TINYLLAMA_CHAT_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)

# Text the tiny tokenizer's BPE merges are learned from: common English, LibriSpeech-like words, chat markup.
_TINY_TOKENIZER_TEXT = """
the of and to a in that he was it his is with as i had for at by on not be she you but her from which they
him this all were have my one so are said their what there we if me would when no been who out an more up
into them then could do some now over see about time only any very man upon or its than our will two little
great made before well like down should after such good long old must say these way first where day through
ship sailed dawn opened book walked home rain voice quiet dog ran across field letter came late sat warm fire
father liked sea children sang song looked dark sky took road door left open wind blew night found small boat
read news aloud garden full light mother house water hand eyes life world heart thought place face room
<|system|> <|user|> <|assistant|> you are a speech recognizer reply with the exact transcript of audio
transcribe this audio
"""


def tiny_backbones(seed=0):
    """A tiny random HubertModel, a tiny random LlamaForCausalLM, a byte-level BPE tokenizer trained offline
    and a feature extractor: deterministic for a seed, built in about a second, for tests, demos and benchmarks.

    The LLM's init is deliberately larger than the usual std 0.02: at that scale a tiny random transformer
    passes almost no signal from the speech positions to the transcript positions, and no adapter can then
    fit anything through it (measured: width 64 / std 0.02 stuck at loss 5.6, width 128 / std 0.1 down to 0.06).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (HubertConfig, HubertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                              Wav2Vec2FeatureExtractor)

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        _TINY_TOKENIZER_TEXT.split("\n"),
        trainers.BpeTrainer(vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                            show_progress=False),
    )
    # BOS at the start of every text, as Llama's tokenizer does (the processor takes the tokenizer's own rule)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", chat_template=TINYLLAMA_CHAT_TEMPLATE)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = HubertModel(HubertConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
            conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
            feat_extract_norm="layer", do_stable_layer_norm=True,  # like hubert-large: takes an attention mask
        ))
        llm = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, initializer_range=0.1,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        ))
    feature_extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                                 do_normalize=True, return_attention_mask=True)
    return encoder.eval(), llm.eval(), tokenizer, feature_extractor
