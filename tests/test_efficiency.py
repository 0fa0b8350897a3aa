"""Every finetune.py run reports its own efficiency: present, in TensorBoard, and consistent (not fast)."""
import json
import time

import pytest
import torch
from conftest import make_model, scalar_tags, tiny_args

import efficiency
import finetune
from batching import SpeechCollator
from dataset import Sample


@pytest.fixture(autouse=True)
def own_peak_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf_home"))


@pytest.mark.parametrize("cached", [True, False], ids=["feature_cache", "encoder_in_steps"])
def test_run_reports_flops_phases_and_mfu(tmp_path, cached):
    out = tmp_path / "out"
    extra = ["--feature_cache", str(tmp_path / "cache")] if cached else []
    start = time.perf_counter()
    assert finetune.main(tiny_args(out, *extra, steps=6)) == 0
    wall = time.perf_counter() - start
    report = json.loads((out / "efficiency.json").read_text())
    phases = report["phase_seconds"]
    assert {"startup", "indexing", "training", "evaluation"} <= set(phases)
    assert ("cache_fill" in phases) == cached
    assert all(s >= 0 for s in phases.values())
    # the phases cover the run: their sum is its wall time (less the argument parsing before the clock starts)
    assert sum(phases.values()) == pytest.approx(report["wall_seconds"], abs=0.01)
    assert report["wall_seconds"] == pytest.approx(wall, rel=0.05, abs=0.5)
    assert phases["training"] > 0 and phases["evaluation"] > 0  # eval every 4 steps and at the end
    flops = report["flops"]
    assert flops["adapter_llm"] > 0 and flops["encoder"] > 0
    assert flops["total"] == pytest.approx(flops["encoder"] + flops["adapter_llm"])
    assert flops["encoder"] == pytest.approx(flops["encoder_cache_fill"] + flops["encoder_in_steps"])
    # the encoder runs once per clip (cache) or in every step, never both
    assert (flops["encoder_cache_fill"] > 0, flops["encoder_in_steps"] > 0) == (cached, not cached)
    assert report["training_steps"] == 6
    for name, mfu in report["mfu"].items():
        assert 0 < mfu <= 1, (name, mfu)
    assert report["dtype"] == "float32" and report["peak_flops_per_device"] > 0
    tags = scalar_tags(out)
    for tag in ("train/efficiency_mfu_whole_run", "train/efficiency_training_seconds",
                "train/efficiency_adapter_llm_flops", "train/mfu", "train/model_tflops"):
        assert tag in tags, sorted(tags)


@pytest.mark.parametrize("cache_prefix", [True, False], ids=["prefix_cached", "prefix_in_steps"])
def test_counted_flops_are_each_batchs_flops(train_clips, cache_prefix):
    # the running sums give exactly the per-batch FLOPs of flops_per_step, from what forward says it computed: with
    # the prefix cached, its P tokens a clip are not run through the LLM in the step (its one-off pass is not counted)
    model = make_model()
    model.cache_prefix = cache_prefix
    collator = SpeechCollator(model.processor)
    run = efficiency.RunEfficiency()
    run.set_model(model, "cpu", torch.float32)
    expected = 0.0
    prompt = len(model.suffix_ids) + (0 if cache_prefix else len(model.prefix_ids))  # a clip's, through the LLM
    clips = list(zip(*train_clips))
    for batch_clips in (clips[:3], clips[3:5]):
        batch = collator([Sample(str(i), t, audio=a) for i, (a, t) in enumerate(batch_clips)])
        with torch.no_grad():
            run.count_step(model(**batch))
        seconds = batch["audio_lengths"].sum().item() / model.sampling_rate
        speech = model.speech_lengths(batch["audio_lengths"]).sum().item()
        targets = (batch["labels"] != -100).sum().item()
        expected += model.flops_per_step(seconds, speech, len(batch_clips) * prompt, targets)
    flops = run.flops()
    assert flops["encoder_in_steps"] + flops["adapter_llm"] == pytest.approx(expected, rel=1e-9)
    assert flops["encoder_in_steps"] > 0 and flops["encoder_cache_fill"] == 0


def test_peak_is_measured_once_per_device_and_dtype(monkeypatch):
    # a GPU without a datasheet entry, or in float32: a measured matmul peak, cached per device and dtype
    calls = []
    monkeypatch.setattr(efficiency, "matmul_peak", lambda device, dtype: calls.append(dtype) or 1e11)
    monkeypatch.setattr(efficiency, "device_name", lambda device: "Some GPU")
    gpu = torch.device("cuda")
    assert efficiency.peak_flops(gpu, torch.float32)[0] == 1e11
    assert efficiency.peak_flops(gpu, torch.float32)[0] == 1e11  # read from the cache file
    assert efficiency.peak_flops(gpu, torch.bfloat16)[0] == 1e11
    assert calls == [torch.float32, torch.bfloat16]
    keys = json.loads(open(efficiency.peak_cache_path()).read())
    assert len(keys) == 2 and all("float32" in k or "bfloat16" in k for k in keys)


def test_a_peak_cached_too_low_is_measured_again(monkeypatch):
    # a peak measured while the machine was shared reads too low; a run that beats it measures it again
    peaks = iter([1e6, 1e15])
    monkeypatch.setattr(efficiency, "matmul_peak", lambda device, dtype: next(peaks))
    monkeypatch.setattr(efficiency, "device_name", lambda device: "Some GPU")
    run = efficiency.RunEfficiency()
    run.set_model(make_model(), "cuda", torch.float32)
    run.fill_audio_seconds = 10.0  # about 1 GFLOP of encoder work in well under a second: above 1e6 FLOP/s
    run.lap("cache_fill")
    report = run.report()
    assert report["peak_flops_per_device"] == 1e15 and 0 < report["mfu"]["whole_run"] <= 1
    assert list(json.loads(open(efficiency.peak_cache_path()).read()).values()) == [1e15]


def test_a_cpu_peak_is_reckoned_from_its_flags_and_no_timing_reads_it_low(monkeypatch):
    monkeypatch.setattr(efficiency, "matmul_peak", lambda *a: pytest.fail("a CPU's peak is not timed"))
    monkeypatch.setattr(efficiency, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    flops, source = efficiency.cpu_peak(torch.float32)
    assert "2 threads x" in source and "x 32 FLOP/cycle" in source  # AVX2: two 8-wide FMAs a cycle
    assert efficiency.cpu_peak(torch.bfloat16)[0] == flops and not efficiency.fast_on_cpu(torch.bfloat16)
    monkeypatch.setattr(efficiency, "cpu_flags", lambda: {"avx512f", "avx512_bf16", "fma"})
    assert efficiency.cpu_peak(torch.float32)[0] == 2 * flops  # AVX-512: twice as wide
    assert efficiency.cpu_peak(torch.bfloat16)[0] == 4 * flops and efficiency.fast_on_cpu(torch.bfloat16)
    run = efficiency.RunEfficiency()
    run.set_model(make_model(), "cpu", torch.float32)
    run.fill_audio_seconds = 10.0
    run.lap("cache_fill")
    report = run.report()
    assert report["mfu"]["whole_run"] < 1 and "GFLOP/s" in efficiency.summary_line(report)  # not "0.00 TFLOP/s"


def test_a_resumed_runs_accounting_covers_the_whole_run(tmp_path, monkeypatch, caplog):
    import finetune
    from conftest import NO_EVAL, tiny_args
    from trainer import SlamASRTrainer

    out = tmp_path / "out"
    args = tiny_args(out, *NO_EVAL, "--save_steps", "2", steps=4)
    real = SlamASRTrainer.training_step

    def killed_at_step_3(self, *a, **kw):
        if self.state.global_step == 3:
            raise KeyboardInterrupt("killed")
        return real(self, *a, **kw)

    monkeypatch.setattr(SlamASRTrainer, "training_step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(args)
    monkeypatch.setattr(SlamASRTrainer, "training_step", real)
    with caplog.at_level("INFO"):
        assert finetune.main(args + ["--resume_from_checkpoint", "last"]) == 0
    assert f"resuming from {out / 'checkpoint-2'} at step 2" in caplog.text
    report = json.loads((out / "efficiency.json").read_text())
    assert report["training_steps"] == 4  # both segments' steps (this one alone trained 2)
    first = json.loads((out / "checkpoint-2" / "efficiency_rank0.json").read_text())
    assert report["wall_seconds"] > first["wall_seconds"] and report["flops"]["total"] > 0
    assert json.loads((out / "train_results.json").read_text())["resumed_from_step"] == 2


@pytest.mark.parametrize("name,flops,memory", [
    ("NVIDIA H100 80GB HBM3", 989.4e12, 80e9), ("NVIDIA H100 PCIe", 756e12, 80e9), ("a100-80gb", 312e12, 80e9),
    ("NVIDIA L40S", 362e12, 48e9), ("NVIDIA L4", 121e12, 24e9), ("NVIDIA A10G", 70e12, 24e9),
    ("NVIDIA GeForce RTX 4090", 165.2e12, 24e9), ("NVIDIA GH200 480GB", 989.4e12, 96e9),
])
def test_datasheets_by_device_name(name, flops, memory):
    # the more specific entries first: an L40S is no L4, a GH200 no H200, an H100 PCIe no SXM H100
    assert efficiency.datasheet_gpu(name) == (flops, memory)
    assert efficiency.datasheet_gpu("NOSUCH") is None
