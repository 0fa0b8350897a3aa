"""
Training throughput of the adapter-only trainer and what each speed lever buys, all measured in one run on
the same clips, with backbones built from configs (random weights: the figures are real, accuracy is not).

    python bench.py --size base --device cpu --batch_size 4 --steps 3
    python bench.py --size full --device cuda --dtype bfloat16 --batch_size 16 --steps 20
    python bench.py --end_to_end --json docs/e2e_base_cpu.json    (finetune.py vs a straightforward trainer)

Configurations: `naive` (encoder every step, random batches, LM head over every position, the prompt's prefix
through the LLM every step, float32 backbones), each lever alone (`cache`: frozen-encoder feature cache; `duration`:
batches by total audio seconds; `head`: LM head only on labelled positions; `prefix`: the prompt prefix's keys and
values computed once; `half`: half-precision backbones with autocast), and `all` together. Prints a table, `speedup vs naive: N.Nx`, and a projection of hours per LibriSpeech-960 h epoch.

`--end_to_end` times whole runs instead of steps: finetune.py start to finish, against a straightforward trainer
of our own (a plain PyTorch loop: encoder every step, LM head over every position, the prompt prefix through the
LLM every step, fixed batches of 4 clips, float32), both reading the same backbones saved to folders and the same flac clips, for the same epochs.
"""

import argparse
import copy
import glob
import io
import json
import math
import os
import tempfile
import time

import numpy as np
import soundfile as sf
import torch

from audio import SAMPLE_RATE, read_audio
from backbones import tiny_backbones
from batching import collate_frames, duration_batches
from corpus import DataReport, Record, read_manifest
from dataset import FeatureCache, Sample, SpeechDataset
from efficiency import matmul_peak, sync
from model import SlamASR, SlamASRConfig
from text import normalize_transcript

LIBRISPEECH_960H_SECONDS = 960 * 3600
WORDS_PER_SECOND = 2.7  # LibriSpeech read speech


def build_backbones(size, seed=0):
    """(encoder, llm, tokenizer, feature_extractor) with random weights; the tiny tokenizer stands in for
    TinyLlama's (its ids all fall inside the 32k vocabulary of the base and full LLMs)."""
    from transformers import HubertConfig, HubertModel, LlamaConfig, LlamaForCausalLM, Wav2Vec2FeatureExtractor

    encoder, llm, tokenizer, feature_extractor = tiny_backbones(seed)
    if size == "tiny":
        return encoder, llm, tokenizer, feature_extractor
    torch.manual_seed(seed)
    if size == "base":  # HuBERT-base (group norm, no attention mask) + a ~100M Llama with a 32k vocabulary
        encoder = HubertModel(HubertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                           intermediate_size=3072, feat_extract_norm="group"))
        llm_config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                                 num_attention_heads=12, num_key_value_heads=12)
        feature_extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                                     do_normalize=False, return_attention_mask=False)
    else:  # HuBERT-large + TinyLlama-1.1B, as in the recipe
        encoder = HubertModel(HubertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                           intermediate_size=4096, feat_extract_norm="layer",
                                           do_stable_layer_norm=True))
        llm_config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
    llm_config.update(dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id))
    return encoder.eval(), LlamaForCausalLM(llm_config).eval(), tokenizer, feature_extractor


def synthetic_corpus(n, seed=0):
    """LibriSpeech-like durations, 2-20 s (mean about 12 s), noise for audio, transcripts of 2.7 words per second
    drawn from the fixture's words (short ones: with the tiny tokenizer the token counts are not TinyLlama's)."""
    rng = np.random.default_rng(seed)
    durations = 2 + 18 * rng.beta(3.0, 2.4, size=n)
    # words of the bundled LibriSpeech fixture's transcripts: a fixed text, so that every commit benchmarks the
    # same token counts (words taken from model.py's source changed with each of its docstrings)
    transcripts = sorted(glob.glob(f"{os.path.dirname(os.path.abspath(__file__))}/tests/fixtures/LibriSpeech/"
                                   "*/*/*/*.trans.txt"))
    words = [w for path in transcripts for line in open(path) for w in line.split()[1:]]
    words = [w for w in normalize_transcript(" ".join(words)).split() if w.isalpha()]
    clips = []
    for i, d in enumerate(durations):
        audio = (0.1 * rng.standard_normal(int(d * SAMPLE_RATE))).astype(np.float32)
        text = " ".join(rng.choice(words, size=max(1, round(d * WORDS_PER_SECOND))))
        clips.append(dict(id=f"clip{i:05d}", audio=audio, text=text, duration=len(audio) / SAMPLE_RATE,
                          audio_identity=f"synthetic:{seed}:{i}"))  # what the feature cache names it by
    return clips


def record(clip):
    """A synthetic clip as the feature cache knows it."""
    return Record(id=clip["id"], text=clip["text"], duration=clip["duration"], identity=clip["audio_identity"])


class InMemory(SpeechDataset):
    """The synthetic clips as a dataset the feature cache can fill from."""

    def __init__(self, clips):
        super().__init__([record(c) for c in clips])
        self.audio = {c["id"]: c["audio"] for c in clips}

    def load(self, record):
        return self.audio[record.id]


def decode_speed(clips, n=8):
    """Audio seconds decoded (flac) and resampled per CPU-second: what one DataLoader worker delivers."""
    blobs = []
    for c in clips[:n]:
        buf = io.BytesIO()
        sf.write(buf, c["audio"], 44100 if len(blobs) % 2 else 16000, format="FLAC")  # half need resampling
        blobs.append(buf.getvalue())
    start = time.process_time()
    decoded = sum(len(read_audio(b)) for b in blobs) / SAMPLE_RATE
    return decoded / max(time.process_time() - start, 1e-9)


def sharing(module, **submodules):
    """A shallow copy of `module` with `submodules` put in: the rest (the frozen backbones) is shared, not copied.
    copy.copy alone would share the table of submodules too, and putting one into the copy would replace it in
    the original (and in every other configuration). The tables of parameters and buffers stay shared: do not
    move the copy (.to) or give it parameters of its own."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    for name, submodule in submodules.items():
        setattr(clone, name, submodule)
    return clone


def run_config(name, model, clips, batches, cache, half_dtype, device, warmup, lr=1e-4):
    """Trains `len(batches)` steps (the first `warmup` untimed); returns throughput, time split and more."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    split = dict(data=0.0, encoder=0.0, llm=0.0, optimizer=0.0)
    audio_seconds = padded_seconds = samples = flops = 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    autocast = torch.autocast(device.type, dtype=half_dtype, enabled=half_dtype is not None)
    for step, batch in enumerate(batches):
        sync(device)
        t0 = time.perf_counter()
        chosen = [clips[i] for i in batch]
        labels = model.processor.labels([c["text"] for c in chosen])[0].to(device)
        if cache is not None:
            frames, frame_lengths = collate_frames([Sample(c["id"], c["text"], frames=cache.read(record(c)))
                                                  for c in chosen])
            frames, frame_lengths = frames.to(device, non_blocking=True), frame_lengths.to(device)
        else:
            input_values, audio_lengths = model.processor.audio([c["audio"] for c in chosen])
            input_values, audio_lengths = input_values.to(device, non_blocking=True), audio_lengths.to(device)
        sync(device)
        t1 = time.perf_counter()
        if cache is None:
            with autocast:
                frames, frame_lengths = model.encode(input_values, audio_lengths)
        sync(device)
        t2 = time.perf_counter()
        with autocast:
            out = model(encoder_frames=frames, frame_lengths=frame_lengths, labels=labels)
        out.loss.backward()
        sync(device)
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        t4 = time.perf_counter()
        if not math.isfinite(out.loss.item()):
            raise RuntimeError(f"{name}: non-finite loss at step {step}")
        if step < warmup:
            continue
        for key, seconds in zip(split, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            split[key] += seconds
        durations = [c["duration"] for c in chosen]
        audio_seconds += sum(durations)
        padded_seconds += max(durations) * len(durations)
        samples += len(chosen)
        speech = model.speech_lengths(torch.tensor([len(c["audio"]) for c in chosen])).sum().item()
        flops += model.flops_per_step(sum(durations), speech, out.prompt_tokens.item(), out.num_tokens.item(),
                                      train_encoder=cache is None, clips=len(chosen))
    seconds = sum(split.values())
    return dict(config=name, audio_s_per_s=audio_seconds / seconds, samples_per_s=samples / seconds,
                step_ms={k: 1000 * v / (len(batches) - warmup) for k, v in split.items()},
                padding=1 - audio_seconds / padded_seconds, flops_per_s=flops / seconds,
                peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "base", "full"], default="base")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="dtype of the half-precision lever (default bfloat16 on cuda; float32 on cpu = lever off)")
    p.add_argument("--batch_size", type=int, default=None, help="clips per batch (default 8; 16 on cuda)")
    p.add_argument("--max_batch_seconds", type=float, default=None,
                   help="audio seconds per duration batch (default: batch_size x mean clip duration)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration, after --warmup")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--clips", type=int, default=None, help="synthetic clips in the pool (default: enough)")
    p.add_argument("--configs", default="naive,cache,duration,head,prefix,half,all",
                   help="comma-separated subset of naive,cache,duration,head,prefix,half,all")
    p.add_argument("--compile", action="store_true", help="torch.compile the LLM body in the `all` configuration")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--end_to_end", action="store_true", help="whole runs: finetune.py vs a straightforward trainer")
    p.add_argument("--epochs", type=int, default=3, help="--end_to_end: epochs of each run")
    p.add_argument("--finetune_args", action="append",
                   help="--end_to_end: more finetune.py arguments, e.g. --bf16; given again, another finetune.py run "
                        "in the same invocation (default: one run of the plain recipe)")
    p.add_argument("--workdir", help="--end_to_end: folder for backbones, clips and outputs (default: temporary)")
    p.add_argument("--fill_lever", action="store_true",
                   help="cache fill of a mask-less encoder (base): one clip at a time vs near-equal batches")
    p.add_argument("--straightforward", metavar="WORKDIR", help=argparse.SUPPRESS)  # the baseline's own process
    args = p.parse_args(argv)
    if args.straightforward:
        return straightforward_run(args.straightforward, args.epochs)
    if args.end_to_end:
        return end_to_end(args)
    if args.fill_lever:
        return fill_lever(args)
    device = torch.device(args.device)
    half = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    half = None if half == torch.float32 else half
    batch_size = args.batch_size or (16 if device.type == "cuda" else 8)
    steps = args.steps + args.warmup
    configs = [c for c in args.configs.split(",") if c != "half" or half is not None]

    torch.manual_seed(0)
    encoder, llm, tokenizer, feature_extractor = build_backbones(args.size)
    config = SlamASRConfig(encoder=f"bench-{args.size}", llm=f"bench-{args.size}")
    base = SlamASR.from_backbones(config, encoder, llm, tokenizer, feature_extractor).to(device)
    clips = synthetic_corpus(args.clips or batch_size * steps * 2)
    mean = float(np.mean([c["duration"] for c in clips]))
    max_batch_seconds = args.max_batch_seconds or batch_size * mean
    naive_batch = max(1, round(max_batch_seconds / mean))
    rng = np.random.default_rng(0)
    random_batches = [list(rng.choice(len(clips), naive_batch, replace=False)) for _ in range(steps)]
    packed = duration_batches([c["duration"] for c in clips], max_batch_seconds, seed=0)[:steps]
    if len(packed) < steps:
        raise SystemExit(f"--clips {len(clips)} gives only {len(packed)} duration batches; raise --clips")

    levers = dict(naive=(False, False, False, False, False), cache=(True, False, False, False, False),
                  duration=(False, True, False, False, False), head=(False, False, True, False, False),
                  prefix=(False, False, False, True, False), half=(False, False, False, False, True),
                  all=(True, True, True, True, half is not None))
    half_base = None
    initial_adapter = copy.deepcopy(base.adapter)
    caches, fill_speed = {}, {}
    results = []
    workdir = tempfile.TemporaryDirectory(prefix="bench-cache-")
    print(f"{args.size} on {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
          f"{len(clips)} clips of mean {mean:.1f} s, batches of {naive_batch} clips or {max_batch_seconds:.0f} s")
    for name in configs:
        use_cache, by_duration, head_only, cache_prefix, use_half = levers[name]
        model = base
        if use_half:
            if half_base is None:  # one half-precision copy of the frozen backbones, shared
                half_base = copy.deepcopy(base)
                half_base.encoder.to(half)
                half_base.llm.to(half)
            model = half_base
        model = sharing(model, adapter=copy.deepcopy(initial_adapter))  # every configuration starts from one init
        model.head_on_targets_only = head_only
        model.cache_prefix = cache_prefix
        if args.compile and name == "all":
            model.llm = sharing(model.llm, model=torch.compile(model.llm.model, dynamic=True))
        cache = None
        if use_cache:
            dtype = next(model.encoder.parameters()).dtype
            if dtype not in caches:
                cache = FeatureCache(workdir.name, config.encoder, SAMPLE_RATE,
                                          model.encoder.config.hidden_size, dtype)
                ds = InMemory(clips)
                sync(device)
                start = time.perf_counter()
                with torch.autocast(device.type, dtype=half, enabled=use_half):
                    cache.fill(model.encode_audio, ds, batch_size=batch_size, batched=model.encoder_batches_exactly)
                sync(device)
                fill_speed[dtype] = sum(ds.durations) / (time.perf_counter() - start)
                caches[dtype] = cache.load_index()
            cache = caches[dtype]
        batches = packed if by_duration else random_batches
        result = run_config(name, model, clips, batches, cache, half if use_half else None, device, args.warmup)
        if use_cache:
            result["cache_fill_audio_s_per_s"] = fill_speed[next(model.encoder.parameters()).dtype]
            result["cache_kb_per_audio_s"] = cache.size_bytes() / sum(c["duration"] for c in clips) / 1e3
        results.append(result)
        print(f"  {name:9s} {result['audio_s_per_s']:8.2f} audio s/s  {result['samples_per_s']:7.2f} samples/s  "
              + "  ".join(f"{k} {v:7.1f} ms" for k, v in result["step_ms"].items())
              + f"  padding {100 * result['padding']:4.1f}%")

    peak = matmul_peak(device, half or torch.float32, 8192 if device.type == "cuda" else 1024)
    decode = decode_speed(clips)
    print(f"\nmatmul peak measured: {peak / 1e12:.2f} TFLOP/s ({half or torch.float32}); "
          f"decoding: {decode:.0f} audio s per CPU-second")
    print(f"{'config':9s} {'audio s/s':>10s} {'MFU':>6s} {'padding':>8s} {'peak GiB':>9s} {'h / 960 h epoch':>16s}")
    for r in results:
        r["mfu"] = r["flops_per_s"] / peak
        r["hours_per_epoch"] = LIBRISPEECH_960H_SECONDS / r["audio_s_per_s"] / 3600
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a"
        print(f"{r['config']:9s} {r['audio_s_per_s']:10.2f} {100 * r['mfu']:5.1f}% {100 * r['padding']:7.1f}% "
              f"{mem:>9s} {r['hours_per_epoch']:16.2f}")
    by_name = {r["config"]: r for r in results}
    summary = dict(size=args.size, device=str(device), dtype=str(half or torch.float32), compiled_llm=args.compile,
                   batch_clips=naive_batch,
                   max_batch_seconds=max_batch_seconds, matmul_peak_flops=peak, decode_audio_s_per_cpu_s=decode,
                   results=results)
    if "naive" in by_name and "all" in by_name:
        best = by_name["all"]
        summary["speedup_vs_naive"] = best["audio_s_per_s"] / by_name["naive"]["audio_s_per_s"]
        first_epoch = LIBRISPEECH_960H_SECONDS * (1 / best["audio_s_per_s"] + 1 / best["cache_fill_audio_s_per_s"])
        print(f"speedup vs naive: {summary['speedup_vs_naive']:.1f}x")
        print(f"LibriSpeech 960 h: first epoch (fills the cache) {first_epoch / 3600:.2f} h, later epochs "
              f"{best['hours_per_epoch']:.2f} h; naive {by_name['naive']['hours_per_epoch']:.2f} h per epoch; "
              f"cache {best['cache_kb_per_audio_s']:.0f} KB per audio second "
              f"({best['cache_kb_per_audio_s'] * LIBRISPEECH_960H_SECONDS / 1e6:.0f} GB for 960 h); "
              f"{best['audio_s_per_s'] / decode:.2f} loader processes keep up without the cache")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def fill_lever(args, clips=8, seconds=10.0):
    """The feature cache fill of `clips` clips of about `seconds` s within finetune.FILL_MAX_PADDING of one
    length (what neighbours in a sorted 960 h corpus are), one clip at a time vs in one batch; both timed in
    this process, on fresh caches, twice in alternation (the best of each kept)."""
    from finetune import FILL_MAX_PADDING

    device = torch.device(args.device)
    encoder, llm, tokenizer, feature_extractor = build_backbones(args.size)
    model = SlamASR.from_backbones(SlamASRConfig(encoder=f"bench-{args.size}", llm=f"bench-{args.size}"),
                                   encoder, llm, tokenizer, feature_extractor).to(device)
    rng = np.random.default_rng(0)
    corpus = synthetic_corpus(clips)
    for i, c in enumerate(corpus):
        c["audio"] = np.resize(c["audio"], int(seconds * (1 - FILL_MAX_PADDING * rng.uniform()) * SAMPLE_RATE))
        c["duration"] = len(c["audio"]) / SAMPLE_RATE
    dataset = InMemory(corpus)
    times = {}
    with tempfile.TemporaryDirectory() as workdir:
        for attempt in range(2):
            for name, padding in (("one_at_a_time", 0.0), ("near_equal_batch", FILL_MAX_PADDING)):
                cache = FeatureCache(f"{workdir}/{name}{attempt}", model.config.encoder, SAMPLE_RATE,
                                          model.encoder.config.hidden_size, torch.float32)
                sync(device)
                start = time.perf_counter()
                cache.fill(model.encode_audio, dataset, batch_size=clips, batched=model.encoder_takes_mask,
                           max_padding=padding)
                sync(device)
                times[name] = min(times.get(name, math.inf), time.perf_counter() - start)
    audio = sum(dataset.durations)
    summary = dict(size=args.size, device=args.device, clips=clips, audio_seconds=audio,
                   encoder_takes_mask=model.encoder_takes_mask,
                   audio_s_per_s={k: audio / v for k, v in times.items()},
                   speedup=times["one_at_a_time"] / times["near_equal_batch"])
    print(f"cache fill, {clips} clips of about {seconds:g} s: " + ", ".join(
        f"{k} {v:.2f} audio s/s" for k, v in summary["audio_s_per_s"].items()) + f"; {summary['speedup']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


# ----------------------------------------------------------------------------------------------------------
# End to end: whole runs, from the process's start to its end


E2E_CLIPS = 12
E2E_BATCH = 4


def write_inputs(workdir, size, clips):
    """The `size` backbones saved with save_pretrained (encoder/, llm/) and `clips` synthetic clips as flac files
    in train.jsonl: what both runs read."""

    encoder, llm, tokenizer, feature_extractor = build_backbones(size)
    encoder.save_pretrained(f"{workdir}/encoder")
    feature_extractor.save_pretrained(f"{workdir}/encoder")
    llm.save_pretrained(f"{workdir}/llm")
    tokenizer.save_pretrained(f"{workdir}/llm")
    os.makedirs(f"{workdir}/clips", exist_ok=True)
    corpus = synthetic_corpus(clips)
    with open(f"{workdir}/train.jsonl", "w") as f:
        for c in corpus:
            sf.write(f"{workdir}/clips/{c['id']}.flac", c["audio"], SAMPLE_RATE, format="FLAC")
            f.write(json.dumps(dict(audio=f"clips/{c['id']}.flac", text=c["text"], id=c["id"])) + "\n")
    return sum(c["duration"] for c in corpus)


def straightforward_run(workdir, epochs):
    """The baseline, in its own process: loads the backbones as finetune.py does, then a plain PyTorch loop over
    fixed batches of E2E_BATCH clips in manifest order, each step reading its flac files and running the encoder,
    the LM head over every position, the prompt prefix through the LLM, float32. Prints its FLOPs (as finetune.py counts them) as JSON."""
    start = time.perf_counter()
    model = SlamASR.from_config(SlamASRConfig(encoder=f"{workdir}/encoder", llm=f"{workdir}/llm"))
    model.head_on_targets_only = False
    model.cache_prefix = False
    records = read_manifest(f"{workdir}/train.jsonl", DataReport("train"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    flops = 0.0
    for _ in range(epochs):
        for i in range(0, len(records), E2E_BATCH):
            batch = records[i:i + E2E_BATCH]
            audios = [read_audio(r.path) for r in batch]
            input_values, audio_lengths = model.processor.audio(audios)
            labels = model.processor.labels([normalize_transcript(r.text) for r in batch])[0]
            out = model(input_values, audio_lengths, labels)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            flops += model.flops_per_step(audio_lengths.sum().item() / SAMPLE_RATE,
                                          model.speech_lengths(audio_lengths).sum().item(), out.prompt_tokens.item(),
                                          out.num_tokens.item())
    print(json.dumps(dict(flops=flops, seconds_in_process=time.perf_counter() - start, loss=out.loss.item())))


def end_to_end(args):
    """The straightforward trainer, then finetune.py once per --finetune_args, then the straightforward trainer
    again, one after the other in this invocation, on the same inputs; wall time and CPU seconds from outside each
    process. The ratio is against the mean of the two baseline runs (their difference says how much the machine's
    load moved meanwhile). MFU against a matmul peak measured here, in the dtype each run computes in."""
    import shlex
    import sys

    for extra in args.finetune_args or []:
        owned = {"--output_dir", "--feature_cache", "--train_manifest", "--encoder", "--llm"} & {
            word.split("=")[0] for word in shlex.split(extra)}
        if owned:
            raise SystemExit(f"--finetune_args {extra!r}: {', '.join(sorted(owned))} is set by the benchmark itself")
    here = os.path.dirname(os.path.abspath(__file__))
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-e2e-")
    audio_seconds = write_inputs(workdir, args.size, E2E_CLIPS)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    mean = audio_seconds / E2E_CLIPS
    baseline_cmd = [sys.executable, f"{here}/bench.py", "--straightforward", workdir, "--epochs", str(args.epochs)]
    print(f"{args.size} backbones and {E2E_CLIPS} clips ({audio_seconds:.0f} audio s) in {workdir}; "
          f"{args.epochs} epochs each")

    def baseline(name):  # the straightforward trainer prints its FLOPs as a JSON line last
        run, stdout = timed_run(name, baseline_cmd, env)
        return {**run, **json.loads(stdout.strip().splitlines()[-1])}

    baselines = [baseline("straightforward")]
    variants = []
    for i, extra in enumerate(args.finetune_args or [""]):
        cmd = [sys.executable, f"{here}/finetune.py", "--encoder", f"{workdir}/encoder", "--llm", f"{workdir}/llm",
               "--train_manifest", f"{workdir}/train.jsonl", "--output_dir", f"{workdir}/out{i}",
               "--feature_cache", f"{workdir}/cache{i}", "--max_batch_seconds", f"{E2E_BATCH * mean:.1f}",
               "--num_train_epochs", str(args.epochs), *(["--use_cpu"] if args.device == "cpu" else []),
               "--seed", "0", *shlex.split(extra)]
        run, _ = timed_run(f"finetune.py {extra}".strip(), cmd, env)
        with open(f"{workdir}/out{i}/efficiency.json") as f:
            run["efficiency"] = json.load(f)
        run.update(finetune_args=extra, flops=run["efficiency"]["flops"]["total"], dtype=run["efficiency"]["dtype"])
        variants.append(run)
    baselines.append(baseline("straightforward, again"))

    peaks = {}
    for run in variants + baselines:
        dtype = run.get("dtype", "float32")
        if dtype not in peaks:
            peaks[dtype] = matmul_peak(torch.device(args.device), getattr(torch, dtype))
        run["mfu"] = run["flops"] / run["wall_seconds"] / peaks[dtype]
    baseline_wall = float(np.mean([b["wall_seconds"] for b in baselines]))
    baseline_cpu = float(np.mean([b["cpu_seconds"] for b in baselines]))
    print(f"straightforward trainer: {baselines[0]['wall_seconds']:.1f} s and {baselines[1]['wall_seconds']:.1f} s "
          f"wall, {100 * baselines[0]['mfu']:.1f}% MFU of {peaks['float32'] / 1e12:.3f} TFLOP/s float32")
    for run in variants:
        run["speedup"] = baseline_wall / run["wall_seconds"]
        run["speedup_cpu_seconds"] = baseline_cpu / run["cpu_seconds"]
        print(f"{run['name']}: {run['speedup']:.2f}x the straightforward trainer ({run['speedup_cpu_seconds']:.2f}x "
              f"in CPU seconds); whole-run MFU {100 * run['mfu']:.1f}% of {peaks[run['dtype']] / 1e12:.3f} TFLOP/s "
              f"{run['dtype']} measured now; phases {run['efficiency']['phase_seconds']}")
    load = os.getloadavg()
    print(f"load average after {load[0]:.1f} on {os.cpu_count()} cores")
    summary = dict(size=args.size, device=args.device, epochs=args.epochs, clips=E2E_CLIPS,
                   audio_seconds=audio_seconds, matmul_peak_flops=peaks, cpu_count=os.cpu_count(),
                   load_average_after=load, straightforward=baselines, finetune=variants)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def timed_run(name, cmd, env):
    """Runs `cmd` to its end: (wall time and CPU seconds, its own and its children's, taken from outside it; its
    standard output)."""
    import resource
    import shlex
    import subprocess

    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds as well as wall time: on a shared machine another tenant's load moves the wall time of one run
    # and not the other's; the CPU time it took moves much less
    run = dict(name=name, command=shlex.join(cmd), wall_seconds=time.perf_counter() - start,
               cpu_seconds=after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
               load_average_before=load)
    if done.returncode:
        raise SystemExit(f"{name} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    print(f"  {name}: {run['wall_seconds']:.1f} s wall, {run['cpu_seconds']:.1f} CPU s", flush=True)
    return run, done.stdout


if __name__ == "__main__":
    main()
