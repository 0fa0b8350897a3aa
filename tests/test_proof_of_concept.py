"""The demo."""
import subprocess
import sys

from conftest import ROOT


def test_demo_tiny_runs_offline(tmp_path):
    out = subprocess.run([sys.executable, "proof_of_concept.py", "--tiny", "--steps", "60"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    losses = [float(line.split("loss")[1]) for line in out.stdout.splitlines() if line.strip().startswith("step")]
    assert losses[-1] < 0.5 * losses[0]
    assert out.stdout.count("WER ") == 2 and "not an accuracy figure" in out.stdout
