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


def test_a_checkpoint_due_at_an_evaluation_is_saved_before_it_and_bad_eval_clips_are_counted(tmp_path, monkeypatch):
    from conftest import FIXTURE
    good = FIXTURE / "dev-clean/2001/3001/2001-3001-0000.flac"
    (tmp_path / "cut.flac").write_bytes(good.read_bytes()[:3000])  # its header reads, its audio does not
    (tmp_path / "dev.jsonl").write_text(json.dumps({"audio": "cut.flac", "text": "a b"}) + "\n")
    out = tmp_path / "out"
    assert finetune.main(tiny_args(out, "--eval_manifest", str(tmp_path / "dev.jsonl"), "--eval_steps", "2",
                                   "--save_steps", "2", steps=4)) == 0  # the clip is counted, the run goes on
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    wer = [e for e in state["log_history"] if "eval_wer" in e]
    assert wer and all(e["eval_wer"] != e["eval_wer"] and e["eval_wer_unreadable_clips"] == 1 for e in wer)  # NaN

    # an evaluation that dies (out of memory, say) no longer takes the steps since the last checkpoint with it
    def dies(self):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(SlamASRTrainer, "generate_and_score", dies)
    out2 = tmp_path / "out2"
    with pytest.raises(RuntimeError, match="out of memory"):
        finetune.main(tiny_args(out2, "--eval_steps", "2", "--save_steps", "2", steps=4))
    assert find_checkpoints(str(out2)) == ([str(out2 / "checkpoint-2")], [])


def test_a_step_stopped_during_its_evaluation_is_evaluated_on_resume(tmp_path, monkeypatch):
    from trainer import StopDuringEvaluation

    real = SlamASRTrainer.generate_and_score

    def stopped_at_step_2(self):
        if self.state.global_step == 2:
            self.stop.received = "SIGTERM"
            raise StopDuringEvaluation("SIGTERM")
        return real(self)

    monkeypatch.setattr(SlamASRTrainer, "generate_and_score", stopped_at_step_2)
    out = tmp_path / "out"
    args = tiny_args(out, "--eval_steps", "2", "--save_steps", "2", steps=4)
    assert finetune.main(args) == 143
    assert find_checkpoints(str(out)) == ([str(out / "checkpoint-2")], [])
    monkeypatch.setattr(SlamASRTrainer, "generate_and_score", real)
    assert finetune.main(args + ["--resume_from_checkpoint", "last"]) == 0
    assert (out / "predictions_step2.jsonl").is_file()  # step 2's evaluation, done when the run went on
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert sorted(e["step"] for e in history if "eval_wer" in e) == [2, 4]


def test_an_adapter_gone_nan_is_never_saved(tmp_path, monkeypatch):
    real = SlamASRTrainer.training_step

    def diverges_at_step_3(self, model, inputs, *a):
        loss = real(self, model, inputs, *a)
        if self.state.global_step == 2:  # the third step's update: weights gone to NaN, the loss still finite
            with torch.no_grad():
                next(self.accelerator.unwrap_model(model).adapter.parameters()).fill_(float("nan"))
        return loss

    monkeypatch.setattr(SlamASRTrainer, "training_step", diverges_at_step_3)
    out = tmp_path / "out"
    assert finetune.main(tiny_args(out, "--eval_split", "", steps=4)) == 1
    assert find_checkpoints(str(out)) == ([], []) and not (out / WEIGHTS_NAME).exists()


def test_one_evaluation_at_the_end(tmp_path, monkeypatch):
    calls = []
    real = SlamASRTrainer.generate_and_score
    monkeypatch.setattr(SlamASRTrainer, "generate_and_score", lambda self: calls.append(self.state.global_step) or
                        real(self))
    out = tmp_path / "out"
    assert finetune.main(tiny_args(out, "--eval_steps", "4", steps=6)) == 0
    assert calls == [4, 6]  # Trainer's own at the last step; finetune.py does not evaluate it again
    assert "eval_wer" in json.loads((out / "eval_results.json").read_text())
