"""Fault cases of issue #11: concurrent runs, kills while saving, broken checkpoints, arguments that would waste a
run, stopping during evaluation. Each test fails without the guard it covers."""
import sys

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
