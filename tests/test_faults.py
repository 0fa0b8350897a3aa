"""Fault cases of issue #11: concurrent runs, kills while saving, broken checkpoints, arguments that would waste a
run, stopping during evaluation. Each test fails without the guard it covers."""
import json
import os
import shutil
import signal
import sys
import threading
import time

import pytest
import torch
from test_finetune import run_script, tiny_args

import finetune
import trainer
from trainer import SlamASRTrainer, checkpoint_problem, find_checkpoints, resolve_resume

NO_EVAL = ("--eval_split", "")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An output_dir with complete checkpoint-4 and checkpoint-8; tests damage copies of it."""
    out = tmp_path_factory.mktemp("trained") / "out"
    assert finetune.main(tiny_args(out, *NO_EVAL, "--save_total_limit", "5", steps=8)) == 0
    return out


def copy_of(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "out")
    return tmp_path / "out"


def test_a_second_run_into_a_held_output_dir_fails_fast_and_a_killed_holder_frees_it(tmp_path):
    out = tmp_path / "out"
    holder = run_script([sys.executable, "-c", "import sys, time\nfrom trainer import hold_output_dir\n"
                         "with hold_output_dir(sys.argv[1]):\n"
                         "    print('held', flush=True)\n"
                         "    time.sleep(300)", str(out)])
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=f"{out} is in use by another run \\(pid {holder.pid} on "):
            finetune.main(tiny_args(out, *NO_EVAL, steps=2))
    finally:
        holder.kill()  # SIGKILL: no cleanup of its own, the kernel drops the lock
        holder.wait()
    assert finetune.main(tiny_args(out, *NO_EVAL, steps=2)) == 0


def killed_at_step(monkeypatch, name, step):
    """Makes trainer.<name> (a SlamASRTrainer method, or a module function) raise at `step`, as a kill would."""
    owner = SlamASRTrainer if hasattr(SlamASRTrainer, name) else trainer
    original = getattr(owner, name)

    def killed(*args, **kwargs):
        trainer_step = args[0].state.global_step if owner is SlamASRTrainer else args[1]
        if trainer_step == step:
            raise KeyboardInterrupt(f"killed in {name} at step {step}")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, killed)


def test_a_checkpoint_saved_again_loses_its_old_completion_marker_first(trained, tmp_path, monkeypatch):
    out = copy_of(trained, tmp_path)
    # resumed from checkpoint-4, killed while checkpoint-8 is written again: new adapter, old optimizer
    killed_at_step(monkeypatch, "_save_optimizer_and_scheduler", 8)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(tiny_args(out, *NO_EVAL, "--save_total_limit", "5",
                                "--resume_from_checkpoint", str(out / "checkpoint-4"), steps=8))
    complete, torn = find_checkpoints(str(out))
    assert complete == [str(out / "checkpoint-4")] and torn == [str(out / "checkpoint-8")]


def test_rotation_waits_for_the_new_checkpoint_to_be_complete(tmp_path, monkeypatch):
    out = tmp_path / "out"
    killed_at_step(monkeypatch, "mark_complete", 4)  # between Trainer's save and our completion marker
    with pytest.raises(KeyboardInterrupt):
        finetune.main(tiny_args(out, *NO_EVAL, "--save_steps", "2", "--save_total_limit", "1", steps=4))
    complete, _ = find_checkpoints(str(out))
    assert complete == [str(out / "checkpoint-2")]  # still there to resume from


def test_rotation_leaves_folders_that_are_not_our_checkpoints(tmp_path):
    out = tmp_path / "out"
    yours = [out / "checkpoint-2.bak", out / "checkpoint-best", out / "checkpoint-x-2"]
    for path in yours:
        path.mkdir(parents=True)
        (path / "notes.txt").write_text("mine")
        os.utime(path, (time.time() - 3600,) * 2)  # oldest of all, were rotation to go by mtime
    assert finetune.main(tiny_args(out, *NO_EVAL, "--save_steps", "2", "--save_total_limit", "1", steps=4)) == 0
    assert all((path / "notes.txt").read_text() == "mine" for path in yours)
    assert find_checkpoints(str(out)) == ([str(out / "checkpoint-4")], [])


def resume_args(out, resume, *extra):
    return finetune.parse_args(tiny_args(out, *NO_EVAL, "--resume_from_checkpoint", str(resume), *extra, steps=12))


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


@pytest.mark.parametrize("damage, problem", [
    (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt is missing"),
    (lambda c: truncate(c / "scheduler.pt"), "scheduler.pt is truncated"),
    (lambda c: truncate(c / "rng_state.pth"), "rng_state.pth is truncated"),
    (lambda c: truncate(c / "adapter.safetensors"), "adapter.safetensors is unreadable"),
    (lambda c: truncate(c / "trainer_state.json"), "trainer_state.json is not valid JSON"),
    (lambda c: (c / "slam_asr_config.json").write_text("{"), "slam_asr_config.json is not valid JSON"),
])
def test_resume_refuses_a_broken_checkpoint_by_file_and_last_falls_back(trained, tmp_path, caplog, damage, problem):
    out = copy_of(trained, tmp_path)
    damage(out / "checkpoint-8")
    config, _, _, training_args = resume_args(out, out / "checkpoint-8")
    with pytest.raises(ValueError, match=f"cannot resume from {out / 'checkpoint-8'}: .*{problem}"):
        resolve_resume(training_args, config)
    _, _, _, training_args = resume_args(out, "last")
    with caplog.at_level("WARNING"):
        assert resolve_resume(training_args, config) == str(out / "checkpoint-4")
    assert any(f"skipping {out / 'checkpoint-8'}: " in r.getMessage() and problem in r.getMessage()
               for r in caplog.records)


def test_resume_refuses_another_model_config_before_loading_anything(trained, tmp_path, monkeypatch):
    out = copy_of(trained, tmp_path)

    def no_backbones(*args, **kwargs):
        raise AssertionError("backbones loaded before the config was compared")

    monkeypatch.setattr(finetune.SlamASR, "from_config", no_backbones)
    args = tiny_args(out, *NO_EVAL, "--resume_from_checkpoint", "last", "--prompt_template", "Say: <speech>",
                     "--adapter_hidden", "128", steps=12)
    with pytest.raises(ValueError) as refused:
        finetune.main(args)
    message = str(refused.value)
    assert "checkpoint-8 was trained with another model config" in message
    assert "adapter_hidden: checkpoint 256, this run 128" in message
    assert "prompt_template: checkpoint '<|system|>" in message and "this run 'Say: <speech>'" in message
    assert "encoder" not in message.split("config than this run's:")[1]  # only what differs


def test_a_plain_resume_unpickles_nothing(trained, tmp_path, monkeypatch):
    out = copy_of(trained, tmp_path)
    loads, load = [], torch.load

    def recorded(*args, **kwargs):
        loads.append((str(args[0]), kwargs.get("weights_only")))
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recorded)
    assert finetune.main(tiny_args(out, *NO_EVAL, "--resume_from_checkpoint", "last", steps=10)) == 0
    assert {os.path.basename(f) for f, _ in loads} >= {"optimizer.pt", "scheduler.pt", "rng_state.pth"}
    assert all(weights_only is True for _, weights_only in loads), loads


def test_an_args_file_gets_the_same_defaults_as_the_command_line(tmp_path):
    import yaml
    values = {"encoder": "tiny", "llm": "tiny", "librispeech_dir": "data", "output_dir": "out", "max_steps": 5,
              "group_by_length": True, "eval_steps": 10, "prompt_template": "Say: <speech>", "weight_decay": 0.01,
              "lr_scheduler_type": "cosine"}
    cli = ["--encoder", "tiny", "--llm", "tiny", "--librispeech_dir", "data", "--output_dir", "out", "--max_steps",
           "5", "--group_by_length", "--eval_steps", "10", "--prompt_template", "Say: <speech>", "--weight_decay",
           "0.01", "--lr_scheduler_type", "cosine"]
    (tmp_path / "args.json").write_text(json.dumps(values))
    (tmp_path / "args.yaml").write_text(yaml.safe_dump(values))
    expected = finetune.parse_args(cli)
    for file in ("args.json", "args.yaml"):
        assert finetune.parse_args([str(tmp_path / file)]) == expected, file
    config, _, data_args, training_args = expected
    assert config.prompt_template == "Say: <speech>"
    assert training_args.learning_rate == 1e-4 and training_args.save_total_limit == 3  # the recipe's, not HF's
    assert data_args.eval_split == "dev-clean" and training_args.do_eval and not training_args.remove_unused_columns
    # arguments after the file override it
    assert finetune.parse_args([str(tmp_path / "args.yaml"), "--max_steps", "7"])[3].max_steps == 7
    (tmp_path / "typo.json").write_text(json.dumps({**values, "learning_rat": 1e-3}))
    with pytest.raises(ValueError, match=r"typo.json: unknown arguments \['learning_rat'\]"):
        finetune.parse_args([str(tmp_path / "typo.json")])


@pytest.mark.parametrize("args, refusal", [
    (["--dataset_name", "d", "--librispeech_dir", "l", "--train_manifest", "m"],
     "--librispeech_dir and --dataset_name and --train_manifest: train on one data source"),
    (["--librispeech_dir", "l", "--train_manifest", "m"], "--librispeech_dir and --train_manifest: train on one"),
    ([], "no data: pass --librispeech_dir, --dataset_name or --train_manifest"),
    (["--train_manifest", "m", "--eval_split", "dev-clean"], "with --train_manifest, evaluate on --eval_manifest"),
    (["--librispeech_dir", "l", "--eval_split", "dev-clean", "--eval_manifest", "e"], "evaluate on one of them"),
    (["--dataset_name", "d"], "--dataset_name needs --eval_split"),
])
def test_one_data_source_and_an_evaluation_that_fits_it(args, refusal):
    with pytest.raises(ValueError, match=refusal):
        finetune.parse_args(["--output_dir", "x", *args])


@pytest.mark.parametrize("args, evaluates_on", [
    (["--train_manifest", "m"], None),  # used to fail at loading: "no data", for the default --eval_split
    (["--train_manifest", "m", "--eval_manifest", "e"], "e"),
    (["--librispeech_dir", "l"], "dev-clean"),
    (["--librispeech_dir", "l", "--eval_split", "dev-other"], "dev-other"),
    (["--librispeech_dir", "l", "--eval_manifest", "e"], "e"),
    (["--dataset_name", "d", "--eval_split", "validation"], "validation"),
])
def test_the_evaluation_each_source_gets(args, evaluates_on):
    _, _, data_args, training_args = finetune.parse_args(["--output_dir", "x", *args])
    assert (data_args.eval_split or data_args.eval_manifest) == evaluates_on
    assert training_args.do_eval == (evaluates_on is not None)


@pytest.mark.parametrize("args, refusal", [
    (["--max_steps", "0"], "--max_steps 0"),
    (["--num_train_epochs", "0"], "--num_train_epochs 0"),
    (["--max_new_tokens", "0"], "--max_new_tokens 0"),
    (["--max_target_tokens", "1"], "--max_target_tokens 1"),
    (["--max_nonfinite_steps", "0"], "--max_nonfinite_steps 0"),
    (["--min_duration", "5", "--max_duration", "2"], "--max_duration 2 .must be > --min_duration 5"),
    (["--min_duration", "-1"], "--min_duration -1"),
    (["--max_eval_samples", "0"], "--max_eval_samples 0"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0"),
])
def test_numbers_that_would_waste_a_run_are_refused_by_name(args, refusal):
    with pytest.raises(ValueError, match=f"out of range: .*{refusal}"):
        finetune.parse_args(["--output_dir", "x", "--librispeech_dir", "l", *args])
    # the model's own numbers are SlamASRConfig's to check, as it parses
    with pytest.raises(ValueError, match="adapter_hidden must be an integer >= 1, got 0"):
        finetune.parse_args(["--output_dir", "x", "--librispeech_dir", "l", "--adapter_hidden", "0"])


def test_epochs_may_be_zero_when_steps_are_set():
    assert finetune.parse_args(["--output_dir", "x", "--librispeech_dir", "l", "--num_train_epochs", "0",
                                "--max_steps", "5"])[3].max_steps == 5


def slow_evaluation(tmp_path, loop):
    """Arguments for a run whose evaluation at step 2 takes minutes on CPU: 1,000 clips of eval loss, or WER
    of 400 clips."""
    from conftest import FIXTURE
    clips = sorted((FIXTURE / "dev-clean").glob("*/*/*.flac"))
    # (decoding is bounded by each clip's duration: the WER pass takes its minutes from the number of clips)
    repeats, extra = (250, ("--predict_with_generate", "false")) if loop == "eval loss" else \
        (100, ("--max_new_tokens", "400"))
    # ids of their own: lines repeating an id are dropped as duplicates
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps({"id": f"clip{i}", "audio": str(c), "text": "words"}) + "\n"
                                                for i, c in enumerate(clips * repeats)))
    return tiny_args(tmp_path / "out", "--eval_manifest", str(tmp_path / "dev.jsonl"), "--max_eval_samples", "1000",
                     "--eval_steps", "2", "--per_device_eval_batch_size", "1", "--per_device_train_batch_size", "2",
                     "--save_steps", "1000", "--report_to", "none", *extra, steps=100000)


def sigterm_during_evaluation(command, **kw):
    """Runs `command`, sends SIGTERM 3 s into the evaluation at step 2: (output, return code, seconds to exit)."""
    proc = run_script(command, **kw)
    watchdog = threading.Timer(240, proc.kill)
    watchdog.start()
    seen = []
    for line in proc.stdout:  # step 2's training log comes just before its evaluation starts
        seen.append(line)
        if "'loss'" in line:
            break
    time.sleep(3)
    assert proc.poll() is None, "".join(seen)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    output = "".join(seen) + proc.communicate(timeout=230)[0]
    watchdog.cancel()
    return output, proc.returncode, time.monotonic() - signalled


@pytest.mark.parametrize("loop", ["eval loss", "WER"])
def test_a_signal_during_evaluation_saves_and_exits_at_the_next_batch(tmp_path, loop):
    output, code, seconds = sigterm_during_evaluation([sys.executable, "finetune.py", *slow_evaluation(tmp_path, loop)])
    assert code == 143, output[-3000:]
    assert seconds < 12, output[-3000:]  # not the rest of the evaluation, then a step
    assert "stopped by SIGTERM at step 2; checkpoint saved" in output and "--resume_from_checkpoint last" in output
    out = tmp_path / "out"
    assert find_checkpoints(str(out)) == ([str(out / "checkpoint-2")], [])
    assert checkpoint_problem(str(out / "checkpoint-2")) is None


def test_two_processes_agree_to_stop_during_evaluation(tmp_path):
    # torchrun passes SIGTERM on to both ranks; 400 WER clips over 2 ranks, a clip each at a time
    output, _, seconds = sigterm_during_evaluation(
        ["torchrun", "--nproc_per_node", "2", "--master_port", "29561", "finetune.py",
         *slow_evaluation(tmp_path, "WER")],
        env_extra={"ACCELERATE_USE_CPU": "true"})
    assert seconds < 20, output[-3000:]
    assert output.count("stopped by SIGTERM at step 2; checkpoint saved") == 2, output[-3000:]
    out = tmp_path / "out"
    assert find_checkpoints(str(out)) == ([str(out / "checkpoint-2")], [])
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(out / "checkpoint-2"))
    assert checkpoint_problem(str(out / "checkpoint-2")) is None


def test_a_transcript_holding_a_special_token_is_dropped_and_counted(tmp_path, caplog):
    from conftest import FIXTURE
    clips = sorted((FIXTURE / "train-clean-100").glob("*/*/*.flac"))[:4]
    texts = ["the ship sailed", "she read the news", "the end </s> of it", "a dog ran"]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"audio": str(c), "text": t}) + "\n"
                                                  for c, t in zip(clips, texts)))
    with caplog.at_level("INFO"):
        assert finetune.main(tiny_args(tmp_path / "out", "--train_manifest", str(tmp_path / "train.jsonl"),
                                       *NO_EVAL, "--per_device_train_batch_size", "2", steps=3,
                                       source=())) == 0  # trained as an EOS in mid-sentence, it would not be
    assert "1  transcript holds the LLM's special token </s>" in caplog.text and "train: 3 clips" in caplog.text
