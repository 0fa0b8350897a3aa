"""Fault cases of issue #11: concurrent runs, kills while saving, broken checkpoints, arguments that would waste a
run, stopping during evaluation. Each test fails without the guard it covers."""
import os
import sys
import time

import pytest
from test_finetune import run_script, tiny_args

import finetune

NO_EVAL = ("--eval_split", "")


def test_a_second_run_into_a_held_output_dir_fails_fast_and_a_killed_holder_frees_it(tmp_path):
    out = tmp_path / "out"
    holder = run_script([sys.executable, "-c", "import sys, time, finetune\n"
                         "with finetune.hold_output_dir(sys.argv[1]):\n"
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
    """Makes finetune.<name> (a SlamASRTrainer method, or a module function) raise at `step`, as a kill would."""
    owner = finetune.SlamASRTrainer if hasattr(finetune.SlamASRTrainer, name) else finetune
    original = getattr(owner, name)

    def killed(*args, **kwargs):
        trainer_step = args[0].state.global_step if owner is finetune.SlamASRTrainer else args[1]
        if trainer_step == step:
            raise KeyboardInterrupt(f"killed in {name} at step {step}")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, killed)


def test_a_checkpoint_saved_again_loses_its_old_completion_marker_first(tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert finetune.main(tiny_args(out, *NO_EVAL, "--save_total_limit", "5", steps=8)) == 0
    # resumed from checkpoint-4, killed while checkpoint-8 is written again: new adapter, old optimizer
    killed_at_step(monkeypatch, "_save_optimizer_and_scheduler", 8)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(tiny_args(out, *NO_EVAL, "--save_total_limit", "5",
                                "--resume_from_checkpoint", str(out / "checkpoint-4"), steps=8))
    complete, torn = finetune.find_checkpoints(str(out))
    assert complete == [str(out / "checkpoint-4")] and torn == [str(out / "checkpoint-8")]


def test_rotation_waits_for_the_new_checkpoint_to_be_complete(tmp_path, monkeypatch):
    out = tmp_path / "out"
    killed_at_step(monkeypatch, "mark_complete", 8)  # between Trainer's save and our completion marker
    with pytest.raises(KeyboardInterrupt):
        finetune.main(tiny_args(out, *NO_EVAL, "--save_total_limit", "1", steps=8))
    complete, _ = finetune.find_checkpoints(str(out))
    assert complete == [str(out / "checkpoint-4")]  # still there to resume from


def test_rotation_leaves_folders_that_are_not_our_checkpoints(tmp_path):
    out = tmp_path / "out"
    yours = [out / "checkpoint-4.bak", out / "checkpoint-best", out / "checkpoint-x-2"]
    for path in yours:
        path.mkdir(parents=True)
        (path / "notes.txt").write_text("mine")
        os.utime(path, (time.time() - 3600,) * 2)  # oldest of all, were rotation to go by mtime
    assert finetune.main(tiny_args(out, *NO_EVAL, "--save_total_limit", "1", steps=8)) == 0
    assert all((path / "notes.txt").read_text() == "mine" for path in yours)
    assert finetune.find_checkpoints(str(out)) == ([str(out / "checkpoint-8")], [])
