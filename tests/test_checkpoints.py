"""The lock, complete checkpoints, rotation, resume (checkpoints.py)."""
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import NO_EVAL, adapter_weights, run_script, tiny_args

import checkpoints
import finetune
import trainer
from checkpoints import COMPLETE_MARKER, find_checkpoints, resolve_resume
from model import WEIGHTS_NAME
from trainer import SlamASRTrainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An output_dir with complete checkpoint-4 and checkpoint-8; tests damage copies of it."""
    out = tmp_path_factory.mktemp("trained") / "out"
    assert finetune.main(tiny_args(out, *NO_EVAL, "--save_total_limit", "5", steps=8)) == 0
    return out


def copy_of(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "out")
    return tmp_path / "out"


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


@contextlib.contextmanager
def another_run_holding(out):
    """Another process holding `out` as a run does (checkpoints.hold_output_dir) for the block, then SIGKILLed:
    no cleanup of its own, the kernel drops the lock."""
    holder = run_script([sys.executable, "-c", "import sys, time\nfrom checkpoints import hold_output_dir\n"
                         "with hold_output_dir(sys.argv[1]):\n"
                         "    print('held', flush=True)\n"
                         "    time.sleep(300)", str(out)])
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_a_second_run_into_a_held_output_dir_fails_fast_and_a_killed_holder_frees_it(tmp_path):
    out = tmp_path / "out"
    with another_run_holding(out) as holder:
        with pytest.raises(RuntimeError, match=f"{out} is in use by another run \\(pid {holder.pid} on "):
            finetune.main(tiny_args(out, *NO_EVAL, steps=2))
    assert finetune.main(tiny_args(out, *NO_EVAL, steps=2)) == 0


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
    return finetune.arguments(tiny_args(out, *NO_EVAL, "--resume_from_checkpoint", str(resume), *extra, steps=12))


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


def test_refuses_to_mix_runs_and_torn_checkpoints(tmp_path):
    out = tmp_path / "out"
    assert finetune.main(tiny_args(out, "--eval_split", "", steps=4)) == 0
    with pytest.raises(ValueError, match="resume_from_checkpoint last"):
        finetune.main(tiny_args(out, "--eval_split", "", steps=4))
    torn = out / "checkpoint-6"
    torn.mkdir()
    (torn / WEIGHTS_NAME).write_bytes(b"half")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        finetune.main(tiny_args(out, "--eval_split", "", "--resume_from_checkpoint", str(torn), steps=8))
    assert finetune.main(tiny_args(out, "--eval_split", "", "--resume_from_checkpoint", "last", steps=8)) == 0
    assert not torn.exists() or (torn / COMPLETE_MARKER).exists()
    assert (out / "checkpoint-8" / COMPLETE_MARKER).is_file()


def test_the_lock_holds_when_its_file_is_removed(tmp_path):
    out = tmp_path / "out"
    with another_run_holding(out):
        os.remove(out / ".finetune.lock")  # a stray rm, or a cleanup script
        with pytest.raises(RuntimeError, match=f"{out} is in use by another run"):
            finetune.main(tiny_args(out, *NO_EVAL, steps=2))


@pytest.mark.parametrize("place, refusal", [
    ("FILE", "a file, not a folder"),
    ("FILE/out", "a part of the path is a file, not a folder"),
    ("READ_ONLY", r"cannot write in it \(Read-only file system\)"),
    ("DANGLING", r"a symbolic link to .*nowhere, which does not exist"),
    ("PIPE", r"exists and is not a folder \(a pipe, a device or a socket\)"),
])
def test_an_output_dir_that_cannot_be_written_is_one_line_naming_it(tmp_path, monkeypatch, place, refusal):
    # were errno's words alone ("[Errno 17] File exists: ..."), without the flag or what to do
    (tmp_path / "FILE").write_text("notes")
    (tmp_path / "DANGLING").symlink_to(tmp_path / "nowhere")
    os.mkfifo(tmp_path / "PIPE")
    if place == "READ_ONLY":  # root writes through any mode bits here: the mount's refusal, as the kernel gives it
        def read_only(path, text):
            raise OSError(30, "Read-only file system", path)
        monkeypatch.setattr(checkpoints, "write_text_atomic", read_only)
    monkeypatch.setattr(finetune.SlamASR, "from_config", lambda *a, **k: pytest.fail("a model loaded first"))
    out = tmp_path / place
    with pytest.raises(OSError, match=f"^--output_dir {out}: {refusal}; choose another place$"):
        finetune.main(tiny_args(out, *NO_EVAL, steps=2))


def test_a_run_resumes_from_a_copied_work_tree_and_into_an_output_dir_named_tiny(tmp_path, monkeypatch):
    # the backbone folders are saved as typed (relative here): a tree copied or moved, or mounted elsewhere on
    # another node, still resumes; `--output_dir tiny` (a folder named as the tiny backbones) is no backbone
    world = Path(__file__).parent / "fixtures" / "world"
    shutil.copytree(world / "encoder", tmp_path / "first" / "backbones" / "encoder")
    monkeypatch.chdir(tmp_path / "first")
    args = [*tiny_args("tiny", *NO_EVAL, steps=2), "--encoder", "backbones/encoder", "--save_steps", "2"]
    assert finetune.main(args) == 0
    shutil.copytree(tmp_path / "first", tmp_path / "second")
    shutil.rmtree(tmp_path / "first")
    monkeypatch.chdir(tmp_path / "second")
    resumed = [*tiny_args("tiny", *NO_EVAL, "--resume_from_checkpoint", "last", steps=3), "--encoder",
               "backbones/encoder/"]  # tab completion's slash: the same folder
    assert finetune.main(resumed) == 0
    assert find_checkpoints("tiny")[0] == ["tiny/checkpoint-2", "tiny/checkpoint-3"]


@pytest.mark.parametrize("resume, refusal", [("/nonexistent/checkpoint-4", "no such folder"),
                                             ("FILE", "a file"), ("false", "no such folder")])
def test_a_resume_path_that_is_no_folder_is_named_so(tmp_path, resume, refusal):
    # was: "... is not a complete checkpoint (no checkpoint_complete.json: the run was killed while saving it ...)"
    (tmp_path / "FILE").write_text("notes")
    resume = str(tmp_path / "FILE") if resume == "FILE" else resume
    with pytest.raises(ValueError, match=f"--resume_from_checkpoint {resume}: {refusal}; pass a checkpoint-N folder"):
        finetune.main(tiny_args(tmp_path / "out", *NO_EVAL, "--resume_from_checkpoint", resume, steps=2))


def test_resuming_from_an_earlier_checkpoint_sets_the_later_ones_aside(trained, tmp_path, caplog):
    out = copy_of(trained, tmp_path)
    with caplog.at_level("WARNING"):
        assert finetune.main(tiny_args(out, *NO_EVAL, "--save_total_limit", "5", "--resume_from_checkpoint",
                                       str(out / "checkpoint-4"), "--save_steps", "2", steps=6)) == 0
    assert f"moving {out / 'checkpoint-8'} aside to {out / 'checkpoint-8.superseded'}" in caplog.text
    assert (out / "checkpoint-8.superseded" / "adapter.safetensors").is_file()  # kept, for the user to decide
    assert find_checkpoints(str(out))[0] == [str(out / f"checkpoint-{n}") for n in (4, 6)]
    config, _, _, training_args = resume_args(out, "last")
    assert resolve_resume(training_args, config) == str(out / "checkpoint-6")  # this run's, not the old run's 8


def test_a_finished_run_started_again_trains_nothing(tmp_path, caplog):
    out = tmp_path / "out"
    args = tiny_args(out, *NO_EVAL, "--save_steps", "5", steps=5)  # 2 steps an epoch: 5 is not a whole epoch
    assert finetune.main(args) == 0
    weights = adapter_weights(out)
    with caplog.at_level("INFO"):
        assert finetune.main(args + ["--resume_from_checkpoint", "last"]) == 0
    assert "already reached --max_steps 5: nothing left to train" in caplog.text
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 5
    assert all(torch.equal(weights[k], v) for k, v in adapter_weights(out).items())


def test_a_changed_chat_template_or_learning_rate_is_refused_on_resume(tmp_path):
    from backbones import tiny_backbones

    _, llm, tokenizer, _ = tiny_backbones()
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    out = tmp_path / "out"
    args = [a if a != "tiny" or i != 3 else str(tmp_path / "llm")
            for i, a in enumerate(tiny_args(out, *NO_EVAL, "--save_steps", "2", steps=2))]
    assert args[2:4] == ["--llm", str(tmp_path / "llm")]
    assert finetune.main(args) == 0
    with pytest.raises(ValueError, match=r"--learning_rate 1e-05: .*checkpoint-2 continues a schedule that started "
                                         r"from 0.003"):
        finetune.main(args + ["--resume_from_checkpoint", "last", "--max_steps", "4", "--learning_rate", "1e-5"])
    template = tmp_path / "llm" / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|user|>", "<|human|>"))
    with pytest.raises(ValueError, match="checkpoint-2 was trained with another model config than this run's: "
                                         "prompt_template: checkpoint '<|system|>.*<|user|>.*this run '.*<|human|>"):
        finetune.main(args + ["--resume_from_checkpoint", "last", "--max_steps", "4"])
