"""Each speed lever of bench.py / finetune.py leaves the loss as it was, within float tolerance."""
import json

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import FIXTURE, make_model

import data


@pytest.fixture(scope="module")
def train_set():
    report = data.DataReport("t")
    return data.build_dataset("t", data.index_librispeech(FIXTURE, "train-clean-100", report), report)


def cache_for(model, root, **kw):
    return data.FeatureCache(root, model.config.encoder, model.sampling_rate, model.encoder.config.hidden_size,
                             next(model.encoder.parameters()).dtype, **kw)


def batch_loss(model, batch):
    batch = {k: v for k, v in batch.items() if k != "data_stats"}
    with torch.no_grad():
        return model(**batch).loss


def test_feature_cache_gives_the_same_loss(train_set, tmp_path):
    model = make_model()
    cache = cache_for(model, tmp_path)
    assert cache.fill(model.encode_audio, train_set, batch_size=3) == []
    cache.load_index()
    assert set(cache.index) == {cache.entry_name(r) for r in train_set.records}
    seconds = sum(train_set.durations)
    # fp16 frames of the tiny encoder (64 wide, 50 Hz): 6.4 KB per second plus safetensors headers
    assert 6000 * seconds < cache.size_bytes() < 8000 * seconds
    cached = data.CachedFeatureDataset(train_set, cache)
    collator = data.SpeechCollator(model.processor)
    from_cache = collator([cached[i] for i in range(4)])
    from_audio = collator([train_set[i] for i in range(4)])
    assert from_cache["encoder_frames"].dtype == torch.float16
    torch.testing.assert_close(batch_loss(model, from_cache), batch_loss(model, from_audio), rtol=1e-3, atol=1e-3)


def test_feature_cache_is_keyed_and_resumable(train_set, tmp_path):
    model = make_model()
    cache = cache_for(model, tmp_path)
    cache.SHARD_BYTES = 1  # one shard per batch, so that a kill can fall between shards
    cache.fill(model.encode_audio, train_set, batch_size=4)
    other = data.FeatureCache(tmp_path, "tiny", 16000, 64, torch.bfloat16)  # another encoder dtype
    assert other.dir != cache.dir and not other.load_index().index
    # a shard whose index entry was never written (killed mid-fill) is not trusted: its clips are redone
    shard = sorted(cache.dir.glob("rank0-*.safetensors"))[-1]
    index = cache.dir / "index-rank0.json"
    entries = json.loads(index.read_text())
    lost = entries.pop(shard.name)
    index.write_text(json.dumps(entries))
    assert not set(lost) & set(cache.load_index().index)
    cache.fill(model.encode_audio, train_set, batch_size=4)
    assert set(cache.load_index().index) == {cache.entry_name(r) for r in train_set.records}


def test_feature_cache_is_keyed_by_the_audio_not_the_id(tmp_path):
    # two manifests list clip0.flac (their default id) for other audio; then one file is rewritten in place
    flacs = sorted((FIXTURE / "train-clean-100").glob("*/*/*.flac"))[:3]
    model = make_model()
    cache = cache_for(model, tmp_path / "cache")

    def manifest_run(folder, flac):
        folder.mkdir(exist_ok=True)
        (folder / "clip0.flac").write_bytes(flac.read_bytes())
        (folder / "m.jsonl").write_text(json.dumps({"audio": "clip0.flac", "text": "words"}))
        report = data.DataReport(folder.name)
        dataset = data.build_dataset(folder.name, data.read_manifest(folder / "m.jsonl", report), report)
        cache.fill(model.encode_audio, dataset)
        cached = data.CachedFeatureDataset(dataset, cache.load_index())
        assert len(cached) == 1
        return cached[0]["frames"].float()

    def encoded(flac):
        with torch.no_grad():
            return model.encode_audio([sf.read(flac, dtype="float32")[0]])[0].half().float()

    first, second = manifest_run(tmp_path / "a", flacs[0]), manifest_run(tmp_path / "b", flacs[1])
    torch.testing.assert_close(first, encoded(flacs[0]))
    torch.testing.assert_close(second, encoded(flacs[1]))  # its own audio, not the first run's entry
    torch.testing.assert_close(manifest_run(tmp_path / "a", flacs[2]), encoded(flacs[2]))  # rewritten in place
    assert len(cache.index) == 3


def test_two_ranks_fill_disjoint_shares(train_set, tmp_path):
    model = make_model()
    for rank in (0, 1):
        cache_for(model, tmp_path).fill(model.encode_audio, train_set, rank=rank, world=2)
    cache = cache_for(model, tmp_path).load_index()
    assert len(cache.index) == len(train_set) and {s.split("-")[0] for s in cache.index.values()} == {"rank0", "rank1"}


def test_duration_batches_and_same_summed_loss(train_set):
    durations = train_set.durations
    batches = data.duration_batches(durations, max_batch_seconds=6.0, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(len(durations)))
    for b in batches:
        assert len(b) == 1 or max(durations[i] for i in b) * len(b) <= 6.0
    rng = np.random.default_rng(0)
    random_batches = np.array_split(rng.permutation(len(durations)), len(batches))
    assert data.padding_fraction(durations, batches) <= data.padding_fraction(durations, random_batches)
    model = make_model()
    collator = data.SpeechCollator(model.processor)

    def summed(bs):
        total = 0.0
        for b in bs:
            batch = collator([train_set[int(i)] for i in b])
            with torch.no_grad():
                out = model(batch["input_values"], batch["audio_lengths"], batch["labels"])
            total += (out.loss * out.num_tokens).item()
        return total

    assert summed(batches) == pytest.approx(summed(random_batches), rel=1e-4)


def test_duration_batch_sampler_gives_ranks_equal_disjoint_shares():
    from finetune import DurationBatchSampler
    rng = np.random.default_rng(0)
    durations = list(2 + 18 * rng.beta(3.0, 2.4, size=600))  # LibriSpeech-like, as in bench.py
    ranks = [DurationBatchSampler(durations, 120.0, rank, 2, seed=5) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    epochs = []
    for epoch in range(3):
        for sampler in ranks:
            sampler.set_epoch(epoch)
        shares = [list(sampler) for sampler in ranks]
        assert [len(s) for s in shares] == [len(ranks[0])] * 2  # same step count on both ranks, every epoch
        clips = [i for share in shares for b in share for i in b]
        assert len(clips) == len(set(clips))  # no clip twice in an epoch (batches are cut, not wrapped, here)
        assert len(clips) > 0.95 * len(durations)
        for b in shares[0] + shares[1]:
            assert max(durations[i] for i in b) * len(b) <= 120.0
        epochs.append({tuple(sorted(b)) for share in shares for b in share})
        random_batches = np.array_split(rng.permutation(len(durations)), len(shares[0]) * 2)
        assert data.padding_fraction(durations, shares[0] + shares[1]) < 0.05 < data.padding_fraction(
            durations, random_batches)
    assert len(epochs[0] & epochs[1]) < 0.5 * len(epochs[0])  # other neighbours share batches each epoch


def test_half_precision_backbones_keep_the_loss(train_set):
    full = make_model()
    half = make_model()
    half.encoder.to(torch.bfloat16)
    half.llm.to(torch.bfloat16)
    assert half.adapter.proj[0].weight.dtype == torch.float32  # master weights stay float32
    audios = [train_set[i]["audio"] for i in range(4)]
    texts = [train_set[i]["text"] for i in range(4)]
    inputs = (*full.processor.audio(audios), full.processor.labels(texts)[0])
    with torch.no_grad():
        reference = full(*inputs).loss  # float32 throughout
        torch.testing.assert_close(half(*inputs).loss, reference, rtol=3e-2, atol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what --bf16 adds on a CPU (Trainer's autocast)
            autocast_loss = half(*inputs).loss
        torch.testing.assert_close(autocast_loss.float(), reference, rtol=3e-2, atol=0)


def test_compiled_llm_body_keeps_the_loss_and_gradients(train_set):
    # what bench.py --compile does: torch.compile the LLM body, shapes dynamic (every batch differs)
    model = make_model()
    batch = data.SpeechCollator(model.processor)([train_set[i] for i in range(3)])
    inputs = (batch["input_values"], batch["audio_lengths"], batch["labels"])
    model.train()

    def loss_and_grad():
        model.adapter.zero_grad()
        loss = model(*inputs).loss
        loss.backward()
        return loss.detach(), model.adapter.proj[0].weight.grad.clone()

    eager = loss_and_grad()
    model.llm.model = torch.compile(model.llm.model, dynamic=True)
    compiled = loss_and_grad()
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-3, atol=1e-5)


def test_bench_smoke(tmp_path):
    import bench
    summary = bench.main(["--size", "tiny", "--device", "cpu", "--batch_size", "2", "--steps", "1", "--warmup", "1",
                          "--json", str(tmp_path / "b.json")])
    by_name = {r["config"]: r for r in summary["results"]}
    assert set(by_name) == {"naive", "cache", "duration", "head", "all"}  # no half lever at float32
    assert by_name["cache"]["step_ms"]["encoder"] < 0.01 * by_name["naive"]["step_ms"]["encoder"]  # never runs
    assert summary["speedup_vs_naive"] > 0 and 0 < by_name["all"]["mfu"] < 1
    assert (tmp_path / "b.json").is_file()


def test_bench_configurations_share_the_backbones_and_start_from_one_adapter():
    # copy.copy of a module shares its table of submodules: an adapter put into such a copy replaced the base's
    # too, and each bench configuration started from the previous one's trained adapter
    import copy

    import bench
    from model import SlamASR, SlamASRConfig
    base = SlamASR.from_backbones(SlamASRConfig(encoder="tiny", llm="tiny"), *bench.build_backbones("tiny"))
    initial = base.adapter
    variant = bench.sharing(base, adapter=copy.deepcopy(initial))
    assert base.adapter is initial and variant.adapter is not initial
    assert variant.llm is base.llm and variant.encoder is base.encoder
    compiled_body = torch.nn.Identity()
    llm = bench.sharing(base.llm, model=compiled_body)
    assert llm.model is compiled_body and base.llm.model is not compiled_body and llm.lm_head is base.llm.lm_head


def test_loader_defaults_fit_the_machine(monkeypatch):
    # On a CPU the step's threads use every core: no loader workers (2 of them on this 2-core machine, restarted
    # each epoch, made the training phase 1.3x slower). With GPUs, each process's share of the cores up to 4
    # workers, kept for the whole run; pinned memory only where there is a GPU to copy to. All overridable.
    import finetune
    args = ["--encoder", "tiny", "--llm", "tiny", "--train_manifest", "m.jsonl"]
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    training_args = finetune.parse_args(args)[3]
    assert training_args.dataloader_num_workers == 0 and not training_args.dataloader_persistent_workers
    assert not training_args.dataloader_pin_memory
    workers = finetune.parse_args(args + ["--dataloader_num_workers", "2"])[3]
    assert workers.dataloader_num_workers == 2 and workers.dataloader_persistent_workers

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    # TrainingArguments would set up that GPU as it parses: this machine has none
    monkeypatch.setattr(finetune.Seq2SeqTrainingArguments, "device", torch.device("cpu"))
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    gpu = finetune.parse_args(args)[3]
    assert gpu.dataloader_num_workers == 4 and gpu.dataloader_persistent_workers
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert finetune.parse_args(args)[3].dataloader_num_workers == 2  # 8 processes share 16 cores
    assert finetune.parse_args(args + ["--dataloader_num_workers", "8"])[3].dataloader_num_workers == 8
    # a CPU run on a machine with a GPU is a CPU run
    assert finetune.parse_args(args + ["--use_cpu"])[3].dataloader_num_workers == 0
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert finetune.parse_args(args)[3].dataloader_num_workers == 0
    no_workers = finetune.parse_args(args + ["--use_cpu", "--dataloader_num_workers", "0"])[3]
    assert not no_workers.dataloader_persistent_workers  # DataLoader refuses persistent workers without workers


def test_maskless_encoder_fill_batches_near_equal_clips_and_keeps_the_loss(train_clips, tmp_path):
    # group-norm HuBERT (base) takes no attention mask: the fill batches only clips within 2% of equal length
    # (a LibriSpeech-sized corpus is full of such neighbours), where it once encoded one clip at a time
    from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

    import bench
    from backbones import tiny_backbones
    from finetune import FILL_MAX_PADDING
    from model import SlamASR, SlamASRConfig
    _, llm, tokenizer, _ = tiny_backbones(0)
    torch.manual_seed(0)
    encoder = HubertModel(HubertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=128, conv_dim=(32,) * 7, num_conv_pos_embeddings=16,
                                       num_conv_pos_embedding_groups=4, feat_extract_norm="group")).eval()
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                         do_normalize=False, return_attention_mask=False)
    model = SlamASR.from_backbones(SlamASRConfig(encoder="tiny-group", llm="tiny", adapter_hidden=256), encoder, llm,
                                   tokenizer, extractor)
    assert not model.encoder_takes_mask
    audios, texts = train_clips
    n = 16000 * 3
    clips = [dict(id=f"c{i}", audio=np.resize(audios[i], int(n * (1 - FILL_MAX_PADDING * i / 6))), text=texts[i])
             for i in range(6)]
    for i, c in enumerate(clips):
        c.update(duration=len(c["audio"]) / 16000, audio_identity=f"near-equal:{i}")
    dataset = bench.InMemory(clips)
    calls = []

    def encode(batch):
        calls.append(len(batch))
        return model.encode_audio(batch)

    collator = data.SpeechCollator(model.processor)
    losses = []
    for name, padding in (("one_at_a_time", 0.0), ("near_equal", FILL_MAX_PADDING)):
        calls.clear()
        cache = cache_for(model, tmp_path / name)
        cache.fill(encode, dataset, batch_size=8, batched=False, max_padding=padding)
        cached = data.CachedFeatureDataset(dataset, cache.load_index())
        losses.append(batch_loss(model, collator([cached[i] for i in range(6)])))
        assert calls == ([1] * 6 if padding == 0 else [6])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-3, atol=0)
    assert data.fill_batches([2.0, 2.0, 2.0, 3.0], 8, max_padding=0.0) == [[0, 1, 2], [3]]  # equal lengths batch
    assert data.fill_batches([1.0, 2.0, 3.0, 4.0], 8, max_seconds=6.0) == [[0, 1], [2], [3]]  # padded seconds cap


def test_eager_attention_keeps_the_loss_and_padded_batches(train_set, tmp_path):
    # --attn_implementation eager (faster than sdpa on a CPU): both backbones take it, loaded by path or built
    # tiny; the loss is sdpa's, and a padded batch still gives each clip's own loss and gradients
    from backbones import load_backbones, tiny_backbones
    from conftest import assert_padded_batch_matches_singles
    from model import SlamASR, SlamASRConfig
    encoder, llm, tokenizer, feature_extractor = tiny_backbones(0)
    for folder, parts in (("encoder", (encoder, feature_extractor)), ("llm", (llm, tokenizer))):
        for part in parts:
            part.save_pretrained(tmp_path / folder)
    config = SlamASRConfig(encoder=str(tmp_path / "encoder"), llm=str(tmp_path / "llm"), adapter_hidden=256)
    models = {}
    for attention in ("sdpa", "eager"):
        torch.manual_seed(0)
        models[attention] = SlamASR.from_config(config, attn_implementation=attention)
        assert models[attention].encoder.config._attn_implementation == attention
        assert models[attention].llm.config._attn_implementation == attention
    built = load_backbones(SlamASRConfig(encoder="tiny", llm="tiny"), attn_implementation="eager")
    assert built[0].config._attn_implementation == built[1].config._attn_implementation == "eager"
    import finetune  # and finetune.py passes the flag on
    trained = finetune.load_model(*finetune.parse_args(["--encoder", "tiny", "--llm", "tiny", "--train_manifest",
                                                         "m.jsonl", "--attn_implementation", "eager"]))
    assert trained.encoder.config._attn_implementation == trained.llm.config._attn_implementation == "eager"
    audios = [train_set[i]["audio"] for i in range(3)]
    texts = [train_set[i]["text"] for i in range(3)]
    with torch.no_grad():
        losses = {name: model.loss(audios, texts) for name, model in models.items()}
    torch.testing.assert_close(losses["eager"], losses["sdpa"], rtol=1e-5, atol=1e-6)
    assert_padded_batch_matches_singles(models["eager"], audios, texts)


def test_end_to_end_bench_runs_each_finetune_variant_between_two_baselines(tmp_path):
    import bench
    summary = bench.main(["--end_to_end", "--size", "tiny", "--epochs", "1", "--workdir", str(tmp_path),
                          "--finetune_args", "--attn_implementation eager", "--json", str(tmp_path / "e2e.json")])
    assert [b["name"] for b in summary["straightforward"]] == ["straightforward", "straightforward, again"]
    assert all(b["flops"] > 0 and b["wall_seconds"] > 0 for b in summary["straightforward"])
    (run,) = summary["finetune"]
    assert run["finetune_args"] == "--attn_implementation eager" and run["dtype"] == "float32"
    assert run["flops"] == run["efficiency"]["flops"]["total"] > 0 and 0 < run["mfu"] < 1
    assert run["speedup"] == pytest.approx(
        (summary["straightforward"][0]["wall_seconds"] + summary["straightforward"][1]["wall_seconds"]) / 2
        / run["wall_seconds"])
    assert json.loads((tmp_path / "e2e.json").read_text())["finetune"][0]["name"] == run["name"]
    with pytest.raises(SystemExit, match="--output_dir is set by the benchmark"):  # before anything runs
        bench.main(["--end_to_end", "--workdir", str(tmp_path / "never"), "--finetune_args=--output_dir=elsewhere"])
    assert not (tmp_path / "never").exists()
