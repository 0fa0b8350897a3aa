"""SlamASRTrainer: signals, non-finite steps, what it overrides (trainer.py)."""
import json
import os
import signal
import sys
import threading
import time

import pytest
import torch
from conftest import adapter_weights, run_script, tiny_args

import finetune
from checkpoints import checkpoint_problem, find_checkpoints
from model import WEIGHTS_NAME, SlamASR
from trainer import SlamASRTrainer


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


def test_nonfinite_loss_skips_step_then_stops(tmp_path, monkeypatch):
    forward = SlamASR.forward
    calls = {"n": 0}

    def sometimes_nan(self, *a, **kw):
        out = forward(self, *a, **kw)
        calls["n"] += 1
        if self.training and calls["n"] in (2, 3):
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(SlamASR, "forward", sometimes_nan)
    out = tmp_path / "out"
    assert finetune.main(tiny_args(out, "--eval_split", "", steps=6)) == 0
    weights = adapter_weights(out)
    assert all(torch.isfinite(w).all() for w in weights.values())  # without the skip, NaN reaches the adapter

    def always_inf(self, *a, **kw):
        out = forward(self, *a, **kw)
        out.loss = out.loss * float("inf")
        return out

    monkeypatch.setattr(SlamASR, "forward", always_inf)
    out2 = tmp_path / "out2"
    assert finetune.main(tiny_args(out2, "--eval_split", "", "--max_nonfinite_steps", "3", steps=6)) == 1
    assert not (out2 / WEIGHTS_NAME).exists()  # nothing saved from a diverged run


def test_the_private_trainer_methods_we_override_are_listed_and_keep_their_signatures():
    import inspect

    import transformers
    from transformers import Trainer

    from trainer import PRIVATE_OVERRIDES

    for name, parameters in PRIVATE_OVERRIDES.items():
        assert hasattr(Trainer, name), (f"transformers {transformers.__version__} has no Trainer.{name}, which "
                                        "trainer.py overrides")
        found = tuple(inspect.signature(getattr(Trainer, name)).parameters)
        assert found == parameters, (f"Trainer.{name} now takes {found} in transformers {transformers.__version__}, "
                                     f"SlamASRTrainer's override expects {parameters}")
    overridden = {n for n in vars(SlamASRTrainer)
                  if n.startswith("_") and not n.startswith("__") and hasattr(Trainer, n)}
    assert overridden == set(PRIVATE_OVERRIDES), "a private Trainer method is overridden without being listed"
