"""
Will it fit, how long: a training run's memory per process and its time per epoch, reckoned before anything
heavy loads (finetune.py --estimate, and the first lines of every run). The model may be the real one or its
shapes on the `meta` device (backbones.backbones_on_meta); the FLOPs are SlamASR.flops_per_step's, the peaks
efficiency.py's: one count of each.

Memory, per process: the frozen backbones' weights in the run's dtype, the adapter's float32 master weights,
its gradients and AdamW's two moments (only the adapter trains), and the activations of the longest batch the
sampler can build. The frozen encoder runs under no_grad: its activations are a transient peak, gone before the
LLM runs. The LLM's are kept for the backward pass that reaches the adapter through it; its linear layers are
frozen, so autograd keeps none of their inputs, only what the norms, the attention and the SwiGLU need.
"""

import math
from dataclasses import dataclass

import torch

from efficiency import GPU_DATASHEETS, datasheet_gpu, peak_flops

GiB = 2**30
ADAM_BYTES_PER_PARAMETER = 4 + 4 + 4  # float32 gradient, exp_avg, exp_avg_sq (the float32 master is the weight)
# The wav2vec2-family conv front end's transient peak under no_grad, in copies of its first conv's output (B, C, L0),
# by its norm (feat_extract_norm): measured, not derived, on CPU (the feature encoder alone, tests/test_estimate.py
# test_conv_front_end_peak): 3.5 with layer norm (it runs on the transposed output: a copy more), 2.5 with group norm
CONV_COPIES = {"layer": 3.5, "group": 2.5}
# Without a data index (--estimate_hours, a stream): LibriSpeech-like clips. 960 h in 281,241 clips (openslr SLR12),
# 12.3 s a clip; read speech at 2.7 words a second (bench.py's WORDS_PER_SECOND) and 1.3 Llama tokens a word, the
# usual figure for English prose: assumed, not measured on LibriSpeech (the test fixture's plain words give 1.03)
NOMINAL_CLIP_SECONDS = 960 * 3600 / 281_241
NOMINAL_TOKENS_PER_SECOND = 2.7 * 1.3
# Transcripts tokenized to count an epoch's target tokens: evenly spaced over the index, the sum scaled up
TOKENIZED_SAMPLE = 20_000


@dataclass(frozen=True)
class Epoch:
    """What one epoch feeds the model: clips, audio seconds, and the padded worst batch the sampler can build."""

    clips: int
    audio_seconds: float
    speech_tokens: int  # the adapter's outputs over the epoch
    target_tokens: int  # transcript + EOS, truncated to max_target_tokens, over the epoch
    batch_clips: int  # the worst batch: this many clips of the longest duration and the longest transcript
    longest_seconds: float
    longest_targets: int
    source: str  # where the figures come from (the data index, or nominal LibriSpeech figures)


@dataclass(frozen=True)
class Estimate:
    """Memory per process (bytes) and time per epoch of one run."""

    epoch: Epoch
    dtype: str
    encoder_weights: int
    llm_weights: int
    adapter_weights: int
    adapter_training: int  # gradients + AdamW state
    encoder_activations: int  # transient, under no_grad, before the LLM runs
    llm_activations: int  # kept for backward: adapter, LLM, LM head over the targets
    llm_tokens: int  # the worst batch's padded LLM positions (all rows)
    encoder_flops: float  # one epoch's, all processes
    adapter_llm_flops: float
    peak_flops: float  # per device
    peak_source: str
    mfu: float
    processes: int
    encoder_in_steps: bool

    @property
    def weights(self):
        return self.encoder_weights + self.llm_weights + self.adapter_weights

    @property
    def total_bytes(self):
        # the encoder's peak comes and goes before the LLM's activations are made; its weights stay
        return self.weights + self.adapter_training + max(self.encoder_activations, self.llm_activations)

    @property
    def epoch_flops(self):
        """An epoch's FLOPs; from the feature cache, the encoder's pass is once per run (its fill), not per epoch."""
        return self.adapter_llm_flops + (self.encoder_flops if self.encoder_in_steps else 0.0)

    @property
    def epoch_seconds(self):
        return self.epoch_flops / (self.processes * self.peak_flops * self.mfu)


# ----------------------------------------------------------------------------------------------------------
# The epoch and its worst batch


def epoch_from_data(model, durations, texts, batch_clips, max_target_tokens, source, languages=None):
    """The epoch of an index (clip durations, transcripts, and each clip's language where it names one); the worst
    batch holds `batch_clips` clips of the longest duration, each with the longest transcript of the tokenized
    sample."""
    samples = torch.tensor([round(d * model.sampling_rate) for d in durations])
    step = max(1, math.ceil(len(texts) / TOKENIZED_SAMPLE))
    languages = languages or [None] * len(texts)
    lengths = [min(len(model.processor.transcript_ids(t, lang)) + 1, max_target_tokens)
               for t, lang in zip(texts[::step], languages[::step])]
    return Epoch(clips=len(durations), audio_seconds=float(sum(durations)),
                 speech_tokens=int(model.speech_lengths(samples).sum()),
                 target_tokens=round(sum(lengths) * len(texts) / len(lengths)), batch_clips=batch_clips,
                 longest_seconds=max(durations), longest_targets=max(lengths), source=source)


def nominal_epoch(model, hours, batch_clips, longest_seconds, max_target_tokens):
    """An epoch of `hours` without an index: LibriSpeech's clip length and speaking rate (NOMINAL_*)."""
    clips = max(1, round(hours * 3600 / NOMINAL_CLIP_SECONDS))
    per_clip = model.speech_lengths(torch.tensor([round(NOMINAL_CLIP_SECONDS * model.sampling_rate)]))
    longest = min(max_target_tokens, math.ceil(NOMINAL_TOKENS_PER_SECOND * longest_seconds) + 1)
    return Epoch(clips=clips, audio_seconds=hours * 3600, speech_tokens=int(per_clip) * clips,
                 target_tokens=round(clips * (NOMINAL_TOKENS_PER_SECOND * NOMINAL_CLIP_SECONDS + 1)),
                 batch_clips=batch_clips, longest_seconds=longest_seconds, longest_targets=longest,
                 source=f"{hours:g} h given (--estimate_hours), LibriSpeech-like: {NOMINAL_CLIP_SECONDS:.1f} s and "
                        f"{NOMINAL_TOKENS_PER_SECOND:.1f} tokens a second per clip")


def worst_batch_clips(per_device_batch, max_batch_seconds, longest_seconds):
    """Clips in the longest batch: the per-device count, or as many of the longest clips as --max_batch_seconds
    holds (a clip longer than it is a batch of its own)."""
    if max_batch_seconds is None:
        return per_device_batch
    return max(1, math.floor(max_batch_seconds / longest_seconds))


# ----------------------------------------------------------------------------------------------------------
# Memory


def parameter_bytes(module):
    return sum(p.numel() * p.element_size() for p in module.parameters())


def encoder_activation_bytes(model, clips, seconds):
    """The frozen encoder's transient peak over a batch of `clips` x `seconds` (no_grad: nothing is kept): the
    larger of its conv front end (CONV_COPIES of its first conv's output) and one transformer layer (its feed-forward
    layer's two intermediate tensors, its first linear's output and that output's activation, held at once; four hidden-sized
    tensors; eager attention's scores), plus the waveform and the frames."""
    config, kind = model.encoder.config, model.encoder_kind
    b = next(model.encoder.parameters()).element_size()
    samples = round(seconds * model.sampling_rate)
    frames = kind.window_frames if hasattr(kind, "window_frames") else int(
        kind.frame_lengths(torch.tensor([samples]))[0])
    d, inter, heads = kind.layer_widths
    conv = 0
    if hasattr(config, "conv_dim"):
        first = (samples - config.conv_kernel[0]) // config.conv_stride[0] + 1
        conv = round(CONV_COPIES[config.feat_extract_norm] * clips * config.conv_dim[0] * first * b)
    layer = clips * frames * (2 * inter + 4 * d) * b
    layer += attention_score_bytes(config, heads, clips, frames, frames, b, copies=2)
    waveform = clips * samples * (4 + b)  # the processor's float32, cast to the encoder's dtype
    return waveform + max(conv, layer) + clips * frames * d * b


def attention_score_bytes(config, heads, clips, queries, keys, b, copies):
    """`copies` of the (clips, heads, queries, keys) attention scores one layer of `config`'s model makes under
    eager attention (the scores and their softmax at once, 2, in a no_grad pass; the softmax autograd keeps, 1,
    in a training step); the fused kernels (sdpa, flash attention) make none (measured on CPU,
    tests/test_estimate.py)."""
    if config._attn_implementation != "eager":
        return 0
    return copies * clips * heads * queries * keys * b


def llm_activation_bytes(model, clips, seconds, targets):
    """What the training step keeps for backward over `clips` clips of `seconds`, each with `targets` target
    tokens, padded to the longest: (bytes, LLM positions). Per position and layer: two RMSNorms' float32 input
    (4 d each), the attention's q, k, v and output (4 d, keys and values repeated to every head), SwiGLU's gate,
    up and their product (3 x intermediate); the final norm; the LM head's logits on the targets (in the dtype,
    in float32, and log-softmax's float32); the adapter's float32 input and hidden layers; one layer's gradients
    in flight."""
    config = model.llm.config
    b = next(model.llm.parameters()).element_size()
    d, inter, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    speech = int(model.speech_lengths(torch.tensor([round(seconds * model.sampling_rate)]))[0])
    prompt = len(model.suffix_ids) + (0 if model.cache_prefix else len(model.prefix_ids))
    positions = clips * (speech + prompt + targets)
    per_layer = 2 * 4 * d + (4 * d + 3 * inter) * b
    llm = positions * (layers * per_layer + 4 * d) + clips * targets * vocab * (b + 4 + 4)
    row = positions // clips  # eager attention keeps every layer's softmax for backward, over the cached prefix too
    keys = row + len(model.prefix_ids) * model.cache_prefix
    llm += layers * attention_score_bytes(config, config.num_attention_heads, clips, row, keys, b, copies=1)
    llm += positions * (2 * inter + 2 * d) * b  # the backward's gradients through one layer
    adapter = model.adapter
    stacked = model.config.downsample * model.encoder.config.hidden_size
    adapter_bytes = clips * speech * (stacked + 2 * model.config.adapter_hidden + config.hidden_size) * 4
    if b < 4:  # autocast's half copies of what the adapter's layers take
        adapter_bytes += clips * speech * (stacked + model.config.adapter_hidden) * b
        adapter_bytes += sum(p.numel() for p in adapter.parameters()) * b
    return llm + adapter_bytes, positions


def estimate(model, epoch, peak_flops, peak_source, mfu, processes=1, encoder_in_steps=True):
    """The run's Estimate: memory from the model's shapes and dtypes at the epoch's worst batch, FLOPs from
    SlamASR.flops_per_step over the epoch's sums (every term is linear in them), time at `mfu` of the peak."""
    adapter = sum(p.numel() for p in model.adapter.parameters())
    clips, seconds = epoch.batch_clips, epoch.longest_seconds
    llm_bytes, positions = llm_activation_bytes(model, clips, seconds, epoch.longest_targets)
    prompt = len(model.suffix_ids) + (0 if model.cache_prefix else len(model.prefix_ids))
    encoder_flops = model.flops_per_step(epoch.audio_seconds, 0, 0, 0, clips=epoch.clips)
    return Estimate(
        epoch=epoch, dtype=str(next(model.llm.parameters()).dtype).replace("torch.", ""),
        encoder_weights=parameter_bytes(model.encoder), llm_weights=parameter_bytes(model.llm),
        adapter_weights=parameter_bytes(model.adapter), adapter_training=adapter * ADAM_BYTES_PER_PARAMETER,
        encoder_activations=encoder_activation_bytes(model, clips, seconds) if encoder_in_steps else 0,
        llm_activations=llm_bytes, llm_tokens=positions,
        encoder_flops=encoder_flops,
        adapter_llm_flops=model.flops_per_step(0.0, epoch.speech_tokens, epoch.clips * prompt, epoch.target_tokens,
                                               train_encoder=False),
        peak_flops=peak_flops, peak_source=peak_source, mfu=mfu, processes=processes,
        encoder_in_steps=encoder_in_steps)


# ----------------------------------------------------------------------------------------------------------
# The device, and what the run says


def device_peak(gpu, device, dtype):
    """(dense FLOP/s, where it comes from) the time is reckoned at: GPU `gpu`'s datasheet (--estimate_gpu), else
    the device here (efficiency.peak_flops: a GPU's datasheet, a CPU's reckoned peak, or a measured matmul)."""
    if gpu is None:
        return peak_flops(device, dtype)
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"--estimate_gpu {gpu}: the datasheet peaks are of fp16/bf16 tensor cores; add --fp16 or "
                         "--bf16 (the recipe's precision)")
    return gpu_datasheet(gpu)[0], f"datasheet dense {str(dtype).replace('torch.', '')} peak of {gpu}"


def gpu_datasheet(gpu):
    """(dense half FLOP/s, memory bytes) of GPU `gpu` (efficiency.GPU_DATASHEETS), or one line naming the known."""
    sheet = datasheet_gpu(gpu)
    if sheet is None:
        raise ValueError(f"--estimate_gpu {gpu}: no datasheet for it; known: "
                         + ", ".join(key for key, *_ in GPU_DATASHEETS))
    return sheet


def size(n):
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def flop(n):
    return next((f"{n / scale:,.1f} {unit}" for scale, unit in ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"))
                 if n >= scale), f"{n / 1e6:,.1f} MFLOP")


def lines(e):
    """The estimate as two log lines: memory, then time."""
    x = e.epoch
    memory = (f"estimate: {size(e.total_bytes)} per process = weights {size(e.weights)} (encoder "
              f"{size(e.encoder_weights)} + LLM {size(e.llm_weights)} in {e.dtype}, adapter {size(e.adapter_weights)} "
              f"in float32) + adapter gradients and AdamW {size(e.adapter_training)} + activations "
              f"{size(max(e.encoder_activations, e.llm_activations))} at the longest batch, {x.batch_clips} x "
              f"{x.longest_seconds:.1f} s ({e.llm_tokens:,} LLM positions, {x.longest_targets} target tokens a "
              f"clip): LLM {size(e.llm_activations)} kept for backward, "
              + (f"frozen encoder {size(e.encoder_activations)} transient before it" if e.encoder_in_steps
                 else "encoder frames from the feature cache"))
    peak = f"{e.peak_flops / 1e12:.1f} TFLOP/s" if e.peak_flops >= 1e12 else f"{e.peak_flops / 1e9:.0f} GFLOP/s"
    encoder = "" if e.encoder_in_steps else " once, in the cache fill, not per epoch"
    time = (f"estimate: one epoch of {x.audio_seconds / 3600:,.2f} h, {x.clips:,} clips ({x.source}): "
            f"{flop(e.epoch_flops)} (encoder {flop(e.encoder_flops)}{encoder}; adapter + LLM "
            f"{flop(e.adapter_llm_flops)}), {duration(e.epoch_seconds)} on {e.processes} x {e.peak_source} "
            f"({peak}) at an assumed {100 * e.mfu:.0f}% MFU (--estimate_mfu): a reckoning, not a measurement")
    return [memory, time]


def duration(seconds):
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 2 * 3600 else f"{seconds / 3600:.1f} h"


def check_fits(e, free_bytes, device, allow=False):
    """Refuses, in one line naming what to change, a run whose estimate exceeds `free_bytes` (what the device has
    free for this process, torch.cuda.mem_get_info's first figure plus what the process already holds); `allow`
    (--ignore_memory_estimate) only warns. Returns the line, or None where it fits."""
    if e.total_bytes <= free_bytes:
        return None
    line = (f"the estimate, {e.total_bytes / GiB:.1f} GiB per process, exceeds the {free_bytes / GiB:.1f} GiB free "
            f"on {device}: lower --per_device_train_batch_size (or --max_batch_seconds, --max_duration)"
            + ("" if e.dtype != "float32" else ", train with --bf16 or --fp16")
            + ("" if not e.encoder_in_steps else ", or precompute the encoder with --feature_cache")
            + "; --ignore_memory_estimate trains anyway")
    if not allow:
        raise ValueError(line)
    return line
