"""
The quick demo.

    python proof_of_concept.py --tiny
        Fully offline on CPU: tiny random backbones, trains an adapter on the bundled fixture, prints the loss
        falling, then transcribes fixture clips with a WER line. A pipeline check, not an accuracy figure.
    python proof_of_concept.py --adapter out/slam-asr-hubert-large-tinyllama [--audio a.flac b.wav]
        The real backbones (by the names in the adapter's config) on a few LibriSpeech test-clean clips
        (hub copy, streamed) or on your files: reference vs hypothesis per clip, and the WER.
"""

import argparse
import sys
from pathlib import Path

import torch

import corpus
from audio import read_audio
from dataset import SpeechDataset
from decoding import decoding_name
from model import SlamASR, SlamASRConfig
from text import normalize_transcript, wer_line, word_error_rate

FIXTURE = Path(__file__).parent / "tests" / "fixtures" / "LibriSpeech"


def fixture_split(split):
    report = corpus.DataReport(split)
    dataset = SpeechDataset(corpus.prepare(split, corpus.index_librispeech(FIXTURE, split, report), report))
    samples = [dataset[i] for i in range(len(dataset))]
    return [s.audio for s in samples], [s.text for s in samples]


def show(references, hypotheses, label):
    for ref, hyp in zip(references, hypotheses):
        print(f"  REF: {ref}\n  HYP: {hyp}\n")
    if any(references):
        print(f"{wer_line(word_error_rate(references, hypotheses), decoding_name(1))} -- {label}")


def tiny_demo(steps):
    torch.manual_seed(0)
    model = SlamASR.from_config(SlamASRConfig(encoder="tiny", llm="tiny", adapter_hidden=256))
    audios, texts = fixture_split("train-clean-100")
    print(f"training the adapter of a tiny random model on {len(audios)} fixture clips (CPU)")
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(1, steps + 1):
        loss = model.loss(audios, texts)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 1 or step % 10 == 0:
            print(f"  step {step:3d}  loss {loss.item():.3f}")
    model.eval()
    print("\nclips it was trained on:")
    show(texts, model.transcribe(audios, max_new_tokens=20),
         "pipeline check on training clips with tiny random backbones, not an accuracy figure")
    test_audios, test_texts = fixture_split("test-clean")
    print("\nunseen clips (a tiny random model memorizes; it cannot generalize):")
    show(test_texts, model.transcribe(test_audios, max_new_tokens=20),
         "pipeline check on unseen clips, not an accuracy figure")


def real_demo(args):
    if args.adapter:
        model = SlamASR.load_adapter(args.adapter, torch_dtype=torch.float16 if args.device == "cuda" else None)
    else:
        print("=" * 80 + "\nNO ADAPTER GIVEN: the adapter is untrained (random), so the output below is meaningless.\n"
              "Train one with `bash script.sh` and pass --adapter OUTPUT_DIR.\n" + "=" * 80)
        model = SlamASR.from_config(SlamASRConfig(), torch_dtype=torch.float16 if args.device == "cuda" else None)
    model = model.to(args.device).eval()
    if args.audio:
        audios, references = [read_audio(a, model.sampling_rate) for a in args.audio], [""] * len(args.audio)
    else:
        hub = corpus.load_hub_dataset("openslr/librispeech_asr", "clean", "test", streaming=True)
        rows = list(hub.take(args.num_clips))
        audios = [read_audio(r["audio"]["bytes"], model.sampling_rate) for r in rows]
        references = [normalize_transcript(r["text"]) for r in rows]
    hypotheses = model.transcribe(audios, max_new_tokens=200)
    show(references, hypotheses, "UNTRAINED ADAPTER, meaningless" if not args.adapter else
         f"{len(audios)} LibriSpeech test-clean clips (a handful: use transcribe.py for a real score)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="offline pipeline check with tiny random backbones")
    p.add_argument("--steps", type=int, default=80, help="adapter training steps of the --tiny demo")
    p.add_argument("--adapter", help="trained adapter directory (finetune.py's output_dir)")
    p.add_argument("--audio", nargs="+", help="your own audio files instead of LibriSpeech test clips")
    p.add_argument("--num_clips", type=int, default=5, help="LibriSpeech test-clean clips to transcribe")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.tiny:
        tiny_demo(args.steps)
    else:
        real_demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
