import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FIXTURE = ROOT / "tests" / "fixtures" / "LibriSpeech"

from model import SlamASR, SlamASRConfig, tiny_backbones  # noqa: E402


def read_split(split):
    """(audios, texts) of a fixture split, LibriSpeech's upper case lowered."""
    audios, texts = [], []
    for trans in sorted((FIXTURE / split).glob("*/*/*.trans.txt")):
        for line in trans.read_text().splitlines():
            utt, text = line.split(" ", 1)
            audio, _ = sf.read(trans.parent / f"{utt}.flac", dtype="float32")
            audios.append(audio)
            texts.append(text.lower())
    return audios, texts


@pytest.fixture(scope="session")
def train_clips():
    return read_split("train-clean-100")


def make_model(adapter="linear", downsample=5, seed=0, **overrides):
    config = SlamASRConfig(encoder="tiny", llm="tiny", adapter=adapter, downsample=downsample, adapter_hidden=256,
                           **overrides)
    torch.manual_seed(seed)
    return SlamASR.from_backbones(config, *tiny_backbones(seed))


def overfit(model, audios, texts, steps=60, lr=3e-3):
    """Adam on the adapter over one batch; returns the losses."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model.loss(audios, texts)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.fixture(scope="session")
def trained_model(train_clips):
    """A tiny model whose adapter has learnt four clips: generation then gives real, stopping transcripts."""
    audios, texts = train_clips
    model = make_model()
    overfit(model, audios[:4], texts[:4], steps=80)
    return model
