"""What only the real artifacts show: the real Llama-2 tokenizer (TinyLlama's vocabulary, tests/fixtures/
llama2-tokenizer), backbone folders saved the way the hub stores them (TinyLlama in bfloat16) and loaded by
path, and mixed precision (bf16 autocast, fp16 with a grad scaler, DeepSpeed in bf16) on the CPU."""
import json
import logging
import os

import pytest
import torch
from conftest import FIXTURE, ROOT, adapter_weights, read_split, run_script, tiny_args

import finetune
from model import DEFAULT_PROMPT_TEMPLATE, SlamASR, SlamASRConfig
from processor import PROMPT_IDS_NAME, SlamASRProcessor

TOKENIZER_DIR = ROOT / "tests" / "fixtures" / "llama2-tokenizer"


TEXT = "he hoped there would be stew for dinner"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def backbone_dirs(tmp_path_factory, tokenizer):
    """(encoder folder, LLM folder) as the hub has them: a HuBERT with hubert-large's structure (layer-norm
    front end, stable layer norm, an attention mask) and its feature extractor; a Llama with TinyLlama's
    32000-piece vocabulary saved in bfloat16, with the real tokenizer."""
    from transformers import (
        HubertConfig,
        HubertModel,
        LlamaConfig,
        LlamaForCausalLM,
        Wav2Vec2FeatureExtractor,
    )

    root = tmp_path_factory.mktemp("backbones")
    torch.manual_seed(0)
    encoder = HubertModel(HubertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, conv_dim=(32,) * 7,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, feat_extract_norm="layer",
        do_stable_layer_norm=True))
    encoder.save_pretrained(root / "hubert")
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(root / "hubert")
    llm = LlamaForCausalLM(LlamaConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=2048, initializer_range=0.1, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False))
    llm.to(torch.bfloat16).save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    assert json.loads((root / "llama" / "config.json").read_text())["dtype"] == "bfloat16"
    return str(root / "hubert"), str(root / "llama")


def real_config(backbone_dirs, **overrides):
    encoder, llm = backbone_dirs
    return SlamASRConfig(encoder=encoder, llm=llm, adapter_hidden=64, **overrides)


def test_backbones_run_in_the_dtype_asked_for_not_the_checkpoints(backbone_dirs, caplog):
    with caplog.at_level(logging.INFO, logger="backbones"):
        model = SlamASR.from_config(real_config(backbone_dirs))
    assert {p.dtype for p in model.llm.parameters()} == {torch.float32}  # saved in bf16: not silently bf16
    assert {p.dtype for p in model.encoder.parameters()} == {torch.float32}
    assert "runs in torch.float32" in caplog.text
    half = SlamASR.from_config(real_config(backbone_dirs), torch_dtype=torch.bfloat16)
    assert {p.dtype for p in half.llm.parameters()} == {p.dtype for p in half.encoder.parameters()} == {torch.bfloat16}


def test_training_sequence_is_the_tokenizers_own_encoding_of_the_conversation(backbone_dirs, tokenizer):
    model = SlamASR.from_config(real_config(backbone_dirs))
    processor = model.processor
    # the default template is TinyLlama's chat template, rendered
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are a speech recognizer. Reply with the exact transcript of the audio."},
         {"role": "user", "content": "Transcribe this audio:\n<speech>"},
         {"role": "assistant", "content": TEXT}], tokenize=False)
    assert rendered.startswith(DEFAULT_PROMPT_TEMPLATE + TEXT + "</s>")
    prefix_text, rest = rendered.split("<speech>")
    expected_prefix = tokenizer(prefix_text)["input_ids"]  # BOS included, as the tokenizer adds it
    expected_tail = tokenizer(rest[: rest.index(TEXT) + len(TEXT) + len("</s>")], add_special_tokens=False)["input_ids"]

    labels, _ = processor.labels([TEXT])
    audio = read_split("dev-clean")[0][0]
    input_values, audio_lengths = processor.audio([audio])
    frames, frame_lengths = model.encode(input_values, audio_lengths)
    speech_embeds, speech_lengths = model.adapt(frames, frame_lengths)
    spliced = model.splice(speech_embeds, speech_lengths, labels)
    inputs_embeds, attention_mask, targets = spliced.inputs_embeds, spliced.attention_mask, spliced.targets
    S = speech_lengths.item()
    text_positions = [*range(len(expected_prefix)), *range(len(expected_prefix) + S, attention_mask.sum().item())]
    embed = model.llm.get_input_embeddings().weight
    torch.testing.assert_close(inputs_embeds[0, text_positions], embed[expected_prefix + expected_tail], rtol=0, atol=0)
    n_targets = len(tokenizer(TEXT, add_special_tokens=False)["input_ids"]) + 1
    assert targets[0][targets[0] != -100].tolist() == expected_tail[-n_targets:]
    first = targets[0][targets[0] != -100][0].item()
    assert tokenizer.convert_ids_to_tokens(first) == "he"  # not "▁he" (540), the word tokenized alone
    # nothing but a newline before the speech and the EOS after it: no lone "▁" (29871) beside it
    assert expected_prefix[-1] == 13 and processor.prefix_ids[-1] == 13 and processor.suffix_ids[0] == 2


def test_a_space_before_the_speech_is_warned_about(tokenizer, caplog):
    from transformers import Wav2Vec2FeatureExtractor
    with caplog.at_level(logging.WARNING, logger="processor"):
        processor = SlamASRProcessor(Wav2Vec2FeatureExtractor(), tokenizer, "USER: audio: <speech>\nASSISTANT: ")
    assert processor.prefix_ids[-1] == 29871 and "whitespace right before <speech>" in caplog.text
    # a suffix that ends in a space gives its last token to the transcript's first word, as the rendered
    # conversation does ("ASSISTANT: he" ends in "▁he")
    labels, _ = processor.labels(["he hoped"])
    whole = tokenizer("\nASSISTANT: he hoped", add_special_tokens=False)["input_ids"]
    assert processor.suffix_ids + labels[0, :-1].tolist() == whole
    assert tokenizer.convert_ids_to_tokens(labels[0, 0].item()) == "▁he"


def test_special_tokens_written_in_a_transcript_are_refused(tokenizer):
    from transformers import Wav2Vec2FeatureExtractor
    processor = SlamASRProcessor(Wav2Vec2FeatureExtractor(), tokenizer, DEFAULT_PROMPT_TEMPLATE)
    with pytest.raises(ValueError, match="special token '</s>'"):
        processor.labels(["the end </s> of it"])


def test_prompt_ids_are_saved_with_the_adapter_and_used_at_inference(backbone_dirs, tmp_path, caplog):
    model = SlamASR.from_config(real_config(backbone_dirs))
    model.save_adapter(tmp_path)
    saved = json.loads((tmp_path / PROMPT_IDS_NAME).read_text())
    assert saved["prefix"] == model.processor.prefix_ids and saved["suffix"] == model.processor.suffix_ids
    # as another transformers version would have made them: "</s>\n" as [2, 29871, 13] instead of [2, 13]
    saved["suffix"] = [2, 29871] + saved["suffix"][1:]
    (tmp_path / PROMPT_IDS_NAME).write_text(json.dumps(saved))
    with caplog.at_level(logging.WARNING, logger="processor"):
        loaded = SlamASR.load_adapter(tmp_path)
    assert loaded.suffix_ids.tolist() == saved["suffix"]  # what the adapter was trained with, not recomputed
    assert "using the saved ones" in caplog.text
    saved["prompt_template"] = "something else <speech>"
    (tmp_path / PROMPT_IDS_NAME).write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="another prompt template"):
        SlamASR.load_adapter(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_adapter_takes_float32_frames(backbone_dirs, dtype):
    model = SlamASR.from_config(real_config(backbone_dirs), torch_dtype=dtype)
    model.adapter.to(dtype)  # what DeepSpeed's engine does to every float parameter under fp16/bf16
    audios, texts = read_split("dev-clean")
    frames, frame_lengths = model.encode(*model.processor.audio(audios[:2]))
    speech_embeds, _ = model.adapt(frames.float(), frame_lengths)  # a cache gives fp16, an encoder fp32
    assert speech_embeds.dtype == dtype
    assert torch.isfinite(model.loss(audios[:2], texts[:2]))
    assert len(model.transcribe(audios[:2], max_new_tokens=3)) == 2


def test_deepspeed_zero2_trains_and_evaluates_in_bf16(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "ds"
    launch = ["accelerate", "launch", "--config_file", "configs/deepspeed_zero2.yaml", "--num_processes", "2",
              "--mixed_precision", "bf16", "--main_process_port", "29536", "finetune.py"]
    args = tiny_args(out, "--bf16", "--per_device_train_batch_size", "2", "--max_eval_samples", "4",
                     "--report_to", "none", steps=4)
    proc = run_script([*launch, *args])
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert "eval WER" in output and len((out / "predictions_step4.jsonl").read_text().splitlines()) == 4
    assert all(torch.isfinite(w).all() for w in adapter_weights(out).values())
    assert {w.dtype for w in adapter_weights(out).values()} == {torch.float32}


def test_finetune_and_transcribe_with_hub_saved_backbones(backbone_dirs, tmp_path, caplog):
    import transcribe

    encoder, llm = backbone_dirs
    out = tmp_path / "out"
    args = tiny_args(out, "--max_eval_samples", "2", "--eval_steps", "2", "--adapter_hidden", "64", steps=2)
    args[args.index("--encoder") + 1], args[args.index("--llm") + 1] = encoder, llm
    with caplog.at_level(logging.INFO):
        assert finetune.main(args) == 0
    assert "runs in torch.float32" in caplog.text and "eval WER" in caplog.text
    model = transcribe.load_model(transcribe.parse_args(["--adapter", str(out), "--device", "cpu",
                                                         str(FIXTURE / "dev-clean")]))
    assert {p.dtype for p in model.llm.parameters()} == {torch.float32}  # "float32 otherwise", as its help says
    assert model.prefix_ids.tolist() == json.loads((out / PROMPT_IDS_NAME).read_text())["prefix"]
    assert os.path.isfile(out / "checkpoint-2" / PROMPT_IDS_NAME)


@pytest.fixture
def cpu_grad_scaler(monkeypatch):
    """Under --fp16 a GPU run gets fp16 autocast and a grad scaler from accelerate; on the CPU accelerate gives
    neither, so give them here (torch runs both on the CPU) to run the path GPU users take."""
    import accelerate

    init = accelerate.Accelerator.__init__

    def with_scaler(self, *a, **kw):
        init(self, *a, **kw)
        if self.state.mixed_precision == "fp16":
            self.scaler, self.native_amp = torch.amp.GradScaler("cpu"), True

    monkeypatch.setattr(accelerate.Accelerator, "__init__", with_scaler)


@pytest.mark.parametrize("precision", ["--fp16", "--bf16"])
def test_mixed_precision_counts_nonfinite_steps_and_stops(tmp_path, monkeypatch, cpu_grad_scaler, caplog, precision):
    forward, calls = SlamASR.forward, {"n": 0}

    def nan_at(steps):
        def patched(self, *a, **kw):
            out = forward(self, *a, **kw)
            assert next(self.llm.parameters()).dtype == (torch.float16 if precision == "--fp16" else torch.bfloat16)
            calls["n"] += 1
            if self.training and calls["n"] in steps:
                out.loss = out.loss * float("nan")  # an overflowing forward
            return out
        return patched

    monkeypatch.setattr(SlamASR, "forward", nan_at({2, 3}))
    out = tmp_path / "some"
    with caplog.at_level(logging.INFO):
        assert finetune.main(tiny_args(out, precision, "--eval_split", "", "--report_to", "none", steps=6)) == 0
    assert "2 non-finite steps" in caplog.text
    assert all(torch.isfinite(w).all() for w in adapter_weights(out).values())  # the bad steps were skipped
    state = json.loads((out / "trainer_state.json").read_text())
    assert max(h.get("nonfinite_steps", 0) for h in state["log_history"]) == 2  # shown in the training logs

    calls["n"] = 0
    monkeypatch.setattr(SlamASR, "forward", nan_at(set(range(100))))
    assert finetune.main(tiny_args(tmp_path / "all", precision, "--eval_split", "", "--report_to", "none",
                                   "--max_nonfinite_steps", "3", steps=6)) == 1
    assert "3 consecutive steps had a NaN/Inf loss" in caplog.text
