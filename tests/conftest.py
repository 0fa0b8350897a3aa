import os
import sys
import tempfile
import threading
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
# nor the user's Hugging Face home: the datasets cache and the measured matmul peaks go to a folder of their own
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="slam-asr-tests-hf-home-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FIXTURE = ROOT / "tests" / "fixtures" / "LibriSpeech"

from backbones import tiny_backbones  # noqa: E402
from model import DEFAULT_PROMPT_TEMPLATE, SlamASR, SlamASRConfig  # noqa: E402
from processor import SlamASRProcessor  # noqa: E402


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


def hub_rows(split):
    """The fixture split as rows of the hub copy's schema (openslr/librispeech_asr), audio as flac bytes."""
    rows = []
    for trans in sorted((FIXTURE / split).glob("*/*/*.trans.txt")):
        for line in trans.read_text().splitlines():
            utt, text = line.split(" ", 1)
            path = trans.parent / f"{utt}.flac"
            speaker, chapter, _ = utt.split("-")
            rows.append(dict(file=str(path), audio={"bytes": path.read_bytes(), "path": path.name}, text=text,
                             speaker_id=int(speaker), chapter_id=int(chapter), id=utt))
    return rows


def hub_dataset(rows):
    import datasets
    return datasets.Dataset.from_list(rows).cast_column("audio", datasets.Audio(decode=False))


@pytest.fixture(scope="session")
def hub_copy(tmp_path_factory):
    """A local folder laid out like the hub repo: parquet shards per split, configs in README.md, so that
    `datasets.load_dataset(folder, "clean", split="train.100", streaming=...)` runs the real loading code."""
    root = tmp_path_factory.mktemp("librispeech_asr")
    layout = {"train.100": ("train-clean-100", 4), "validation": ("dev-clean", 1), "test": ("test-clean", 2)}
    for split, (folder, shards) in layout.items():
        dataset = hub_dataset(hub_rows(folder))
        (root / "clean" / split).mkdir(parents=True)
        for i in range(shards):
            dataset.shard(shards, i, contiguous=True).to_parquet(str(root / "clean" / split / f"{i:05d}.parquet"))
    files = "".join(f"  - split: {split}\n    path: clean/{split}/*.parquet\n" for split in layout)
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: clean\n  data_files:\n{files}---\n")
    return root


@pytest.fixture(scope="session")
def train_clips():
    return read_split("train-clean-100")


def tiny_processor(prompt_template=DEFAULT_PROMPT_TEMPLATE):
    _, _, tokenizer, feature_extractor = tiny_backbones()
    return SlamASRProcessor(feature_extractor, tokenizer, prompt_template)


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


def returns_within(seconds, call, fifo):
    """call()'s result, run in a thread. Fails the test if it is still running after `seconds` (blocked opening
    `fifo`), after opening the FIFO's write end once: the stuck reader then sees end-of-file and ends."""
    outcome = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as e:  # re-raised in the test's thread
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        thread.join(seconds)
        pytest.fail(f"still running after {seconds} s: it opened the FIFO {fifo}")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def assert_padded_batch_matches_singles(model, audios, texts):
    """The summed token loss and the adapter's gradients of a padded batch equal those of each clip alone."""
    def sum_loss_and_grads(a, t):
        model.zero_grad()
        batch = model.processor(audios=a, texts=t)
        batch.pop("num_truncated")
        out = model(**batch)
        (out.loss * out.num_tokens).backward()  # summed token loss: adds up exactly across clips
        return (out.loss * out.num_tokens).item(), [p.grad.clone() for p in model.adapter.parameters()]

    batch_loss, batch_grads = sum_loss_and_grads(audios, texts)
    singles = [sum_loss_and_grads([a], [t]) for a, t in zip(audios, texts)]
    assert batch_loss == pytest.approx(sum(s[0] for s in singles), rel=1e-4)
    for i, g in enumerate(batch_grads):
        torch.testing.assert_close(g, sum(s[1][i] for s in singles), rtol=1e-3, atol=1e-5)
