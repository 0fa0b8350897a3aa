"""bench.py runs and measures what it says."""
import json

import pytest
import torch


def test_bench_smoke(tmp_path):
    import bench
    summary = bench.main(["--size", "tiny", "--device", "cpu", "--batch_size", "2", "--steps", "1", "--warmup", "1",
                          "--json", str(tmp_path / "b.json")])
    by_name = {r["config"]: r for r in summary["results"]}
    assert set(by_name) == {"naive", "cache", "duration", "head", "prefix", "all"}  # no half lever at float32
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
