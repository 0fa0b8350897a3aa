"""estimate.py: the memory reckoning against the peak memory a CPU step measures, the epoch's FLOPs against the FLOP
counter, and finetune.py --estimate's lines, its one-line errors and the refusal of a run that will not fit.

Memory is measured in a subprocess of its own as the peak resident set (VmHWM, reset through /proc/self/clear_refs
just before the measured step) less the resident set at rest just before it, with glibc returning every freed
block over 64 KB to the system (MALLOC_MMAP_THRESHOLD_): what torch's CPU tensors hold, not what the allocator kept.
Bytes, not seconds: nothing here depends on the machine's load.
"""

import json
import os
import subprocess
import sys
import types

import pytest
import torch
from conftest import FIXTURE, ROOT, make_model, run_script

import efficiency
import estimate
import finetune
from batching import SpeechCollator
from dataset import Sample

# The estimate of a step's memory above the resting state, against the measured: never more than 10% under it, at
# most 50% over (what it counts that the allocator shares or frees early), with 8 MiB of slack for the tiny size
LOW, HIGH, SLACK = 0.9, 1.5, 8 * 2**20
MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "2"}


def resident(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM back to the current resident set


def whisper_backbones():
    """A Whisper encoder of whisper-tiny's shapes (384 wide, 4 layers, 6 heads, the 30 s window of 1500 frames) and
    the tiny LLM, random weights."""
    import transformers as tf

    from backbones import tiny_backbones

    _, llm, tokenizer, _ = tiny_backbones(0)
    config = tf.WhisperConfig(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536,
                              num_mel_bins=80, max_source_positions=1500, decoder_layers=1, decoder_attention_heads=2,
                              decoder_ffn_dim=64, vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              decoder_start_token_id=1)
    encoder = tf.WhisperModel(config).get_encoder().eval()
    return encoder, llm, tokenizer, tf.WhisperFeatureExtractor(feature_size=80)


def measure_step(size, clips, seconds, words, cached, attention="sdpa"):
    """(subprocess) One training step of `clips` clips of `seconds` each (transcripts of 4 x `words` words), of
    bench.py's `size` backbones (or whisper_backbones) in float32, both with `attention`, after a warm-up step:
    prints the measured bytes above rest and the estimate's figure for the same (activations and adapter
    gradients: the weights and AdamW's moments are at rest already)."""
    import gc

    import bench
    from model import SlamASR, SlamASRConfig

    torch.manual_seed(0)
    encoder, llm, tokenizer, feature_extractor = (whisper_backbones() if size == "whisper"
                                                  else bench.build_backbones(size))
    for backbone in (encoder, llm):
        backbone.config._attn_implementation = attention
    model = SlamASR(SlamASRConfig(encoder=size, llm=size), encoder, llm, tokenizer, feature_extractor).train()
    audios = [0.1 * torch.randn(int(seconds * model.sampling_rate)).numpy() for _ in range(clips)]
    batch = model.processor(audios=audios, texts=[" ".join(["the ship sailed home"] * words)] * clips)
    inputs = dict(batch)
    if cached:
        with torch.no_grad():
            frames, lengths = model.encode(batch["input_values"], batch["audio_lengths"])
        inputs = {"encoder_frames": frames, "frame_lengths": lengths, "labels": batch["labels"]}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

    def step():
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        gc.collect()

    step()  # AdamW's moments, the runtime's lazy buffers: at rest from here on
    rest = resident("VmRSS")
    reset_peak()
    step()
    measured = resident("VmHWM") - rest
    targets = int((batch["labels"] != -100).sum(1).max())
    epoch = estimate.Epoch(clips=clips, audio_seconds=clips * seconds, speech_tokens=0, target_tokens=0,
                           batch_clips=clips, longest_seconds=seconds, longest_targets=targets, source="test")
    e = estimate.estimate(model, epoch, 1e12, "test", 0.35, encoder_in_steps=not cached)
    moments = 8 * sum(p.numel() for p in model.adapter.parameters())
    print(json.dumps({"measured": measured, "estimated": e.total_bytes - e.weights - moments}))


def measure_conv(size, clips, seconds):
    """(subprocess) The feature encoder alone under no_grad: its peak in copies of its first conv's output."""
    import bench

    encoder = bench.build_backbones(size)[0]
    x = torch.randn(clips, int(seconds * 16000))
    config = encoder.config
    with torch.no_grad():
        encoder.feature_extractor(x[:, :16000])
        rest = resident("VmRSS")
        reset_peak()
        encoder.feature_extractor(x)
    first = (x.shape[1] - config.conv_kernel[0]) // config.conv_stride[0] + 1
    copies = (resident("VmHWM") - rest) / (clips * config.conv_dim[0] * first * 4)
    print(json.dumps({"copies": copies, "norm": config.feat_extract_norm}))


def in_subprocess(call):
    """The JSON line that `call` (Python source, run in this module) prints, from a fresh process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), **MEASURE_ENV)
    out = subprocess.run([sys.executable, "-c", f"import test_estimate as t; t.{call}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def assert_near_measured(got):
    measured, estimated = got["measured"], got["estimated"]
    assert LOW * measured <= estimated <= HIGH * measured + SLACK, (measured, estimated, estimated / measured)


@pytest.mark.parametrize("cached", [False, True], ids=["encoder_in_step", "feature_cache"])
@pytest.mark.parametrize("size,clips,seconds,words", [("tiny", 8, 20.0, 20), ("base", 2, 10.0, 8)])
def test_memory_estimate_matches_measured_cpu_peak(size, clips, seconds, words, cached):
    assert_near_measured(in_subprocess(f"measure_step({size!r}, {clips}, {seconds}, {words}, {cached})"))


@pytest.mark.parametrize("size,clips,seconds,cached,attention", [
    ("whisper", 1, 10.0, False, "sdpa"), ("whisper", 4, 10.0, False, "sdpa"), ("whisper", 1, 10.0, False, "eager"),
    ("whisper", 4, 10.0, False, "eager"), ("base", 4, 40.0, True, "eager")])
def test_memory_estimate_of_whisper_and_of_eager_attention(size, clips, seconds, cached, attention):
    # Whisper's encoder runs its whole 30 s window (1500 frames) for any clip, where the (heads, 1500, 1500)
    # scores of eager attention are 3x a layer's other activations; sdpa's kernel never makes them. The LLM
    # under eager attention keeps every layer's softmax for backward (4 clips of 40 s: a third of what it keeps).
    assert_near_measured(in_subprocess(f"measure_step({size!r}, {clips}, {seconds}, 8, {cached}, {attention!r})"))


@pytest.mark.parametrize("size", ["tiny", "base"])
def test_conv_front_end_peak(size):
    # the source of estimate.CONV_COPIES: layer norm (tiny, like hubert-large) and group norm (base)
    got = in_subprocess(f"measure_conv({size!r}, 2, 10.0)")
    assert got["copies"] == pytest.approx(estimate.CONV_COPIES[got["norm"]], rel=0.05)


def test_epoch_flops_are_the_flop_counters(train_clips):
    # the epoch's FLOPs are exactly what RunEfficiency counts over the same clips, step by step
    model = make_model()
    collator = SpeechCollator(model.processor)
    audios, texts = train_clips
    run = efficiency.RunEfficiency()
    run.set_model(model, "cpu", torch.float32)
    for start in range(0, len(audios), 3):
        batch = collator([Sample(str(i), texts[i], audio=audios[i]) for i in range(start, min(start + 3, len(audios)))])
        with torch.no_grad():
            run.count_step(model(**batch))
    durations = [len(a) / model.sampling_rate for a in audios]
    epoch = estimate.epoch_from_data(model, durations, texts, 3, 256, "test")
    e = estimate.estimate(model, epoch, 1e12, "test", 0.5)
    counted = run.flops()
    assert e.encoder_flops == pytest.approx(counted["encoder_in_steps"], rel=1e-9)
    assert e.adapter_llm_flops == pytest.approx(counted["adapter_llm"], rel=1e-9)
    assert e.epoch_seconds == pytest.approx(e.epoch_flops / 0.5e12)


def run_finetune(*args):
    proc = run_script([sys.executable, "finetune.py", *args])
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def test_a_run_on_a_whisper_encoder_checkpoint_reckons_its_estimate_and_trains(tmp_path):
    # a whole encoder-decoder checkpoint, as openai/whisper-* are: its config names a layer's widths d_model,
    # encoder_ffn_dim and encoder_attention_heads (the estimate once asked it for intermediate_size and crashed
    # every run with a Whisper encoder)
    from test_backbones import build_encoder

    whisper, feature_extractor = build_encoder("whisper")
    whisper.save_pretrained(tmp_path / "whisper")
    feature_extractor.save_pretrained(tmp_path / "whisper")
    code, out = run_finetune("--encoder", str(tmp_path / "whisper"), "--llm", "tiny", "--librispeech_dir",
                             str(FIXTURE), "--use_cpu", "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
                             "--eval_split", "")
    assert code == 0, out
    assert "frozen encoder" in out and "one epoch of" in out  # the estimate, then the run
    assert (tmp_path / "out" / "adapter.safetensors").exists()


def test_estimate_flag_prints_and_exits(tmp_path):
    code, out = run_finetune("--encoder", "tiny", "--llm", "tiny", "--librispeech_dir", str(FIXTURE), "--use_cpu",
                             "--output_dir", str(tmp_path / "out"), "--estimate")
    assert code == 0, out
    lines = [line for line in out.splitlines() if "estimate: " in line]
    assert len(lines) == 2, out
    assert "per process = weights" in lines[0] and "kept for backward" in lines[0]
    assert "one epoch of" in lines[1] and "assumed 35% MFU" in lines[1] and "not a measurement" in lines[1]
    assert "train batches" not in out and not (tmp_path / "out").exists()  # nothing written, no folder locked


def test_estimate_of_the_recipe_on_a_datasheet_gpu(tmp_path):
    # the README's table: the real configs (configs/), no data, the recipe's batch, fp16
    code, out = run_finetune("--encoder", "configs/hubert-large-ls960-ft", "--llm", "configs/tinyllama-1.1b-chat",
                             "--fp16", "--per_device_train_batch_size", "8", "--estimate_hours", "960",
                             "--estimate_gpu", "A100 40GB", "--estimate_mfu", "0.4", "--estimate", "--use_cpu",
                             "--output_dir", str(tmp_path / "out"))
    assert code == 0, out
    assert "LLM 2.05 GiB in float16" in out and "281,241 clips" in out, out
    assert "datasheet dense float16 peak of A100 40GB (312.0 TFLOP/s) at an assumed 40% MFU" in out
    assert "fits the 40 GB of A100 40GB" in out


@pytest.mark.parametrize("args,says", [
    (("--estimate_gpu", "NOSUCH", "--fp16"), "--estimate_gpu NOSUCH: no datasheet for it; known: H100 PCIe"),
    (("--estimate_gpu", "H100"), "--estimate_gpu H100: the datasheet peaks are of fp16/bf16 tensor cores"),
], ids=["unknown_gpu", "float32"])
def test_estimate_mistakes_are_one_line(tmp_path, args, says):
    code, out = run_finetune("--encoder", "tiny", "--llm", "tiny", "--librispeech_dir", str(FIXTURE), "--use_cpu",
                             "--output_dir", str(tmp_path / "out"), "--estimate", *args)
    errors = [line for line in out.splitlines() if line.startswith("finetune.py: error:")]
    assert code == 2 and len(errors) == 1 and says in errors[0], out
    assert "Traceback" not in out


def test_estimate_mfu_is_a_share(tmp_path):
    with pytest.raises(ValueError, match=r"--estimate_mfu 1.5 \(must be a share of the peak, > 0 and <= 1\)"):
        finetune.arguments(["--encoder", "tiny", "--llm", "tiny", "--librispeech_dir", str(FIXTURE),
                            "--output_dir", str(tmp_path), "--estimate", "--estimate_mfu", "1.5"])


def tiny_estimate(batch_clips=8):
    model = make_model()
    epoch = estimate.Epoch(clips=10, audio_seconds=100.0, speech_tokens=500, target_tokens=300,
                           batch_clips=batch_clips, longest_seconds=10.0, longest_targets=40, source="test")
    return estimate.estimate(model, epoch, 1e12, "test", 0.35)


def test_free_memory_check_refuses_an_oversized_estimate():
    e = tiny_estimate()
    assert estimate.check_fits(e, e.total_bytes, "GPU") is None
    with pytest.raises(ValueError, match="exceeds the .* GiB free on GPU: lower --per_device_train_batch_size .*"
                                         "--bf16 or --fp16.*--feature_cache; --ignore_memory_estimate"):
        estimate.check_fits(e, e.total_bytes - 1, "GPU")
    assert "exceeds" in estimate.check_fits(e, e.total_bytes - 1, "GPU", allow=True)  # a warning, then


def test_run_checks_the_gpu_free_memory_before_training(monkeypatch):
    # finetune.check_memory on a (pretended) GPU: this process's free memory plus what it already holds
    e = tiny_estimate()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (e.total_bytes - 2**20, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA L4")
    training_args = types.SimpleNamespace(device=torch.device("cuda"))
    data_args = types.SimpleNamespace(ignore_memory_estimate=False)
    with pytest.raises(ValueError, match="free on NVIDIA L4"):
        finetune.check_memory(e, data_args, training_args)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 2**20)  # the weights it loaded already
    finetune.check_memory(e, data_args, training_args)
    finetune.check_memory(e, data_args, types.SimpleNamespace(device=torch.device("cpu")))  # a CPU: no check


def test_worst_batch():
    assert estimate.worst_batch_clips(8, None, 30.0) == 8
    assert estimate.worst_batch_clips(8, 100.0, 30.0) == 3  # as many of the longest clips as the seconds hold
    assert estimate.worst_batch_clips(8, 20.0, 30.0) == 1  # a clip longer than the batch is a batch of its own
