"""
Batch inference with a trained adapter, and WER when references are known.

    python transcribe.py --adapter out/slam-asr FILES_OR_FOLDERS... --output preds.jsonl
    python transcribe.py --adapter out/slam-asr --librispeech_dir /data/LibriSpeech --split test-clean
    python transcribe.py --adapter out/slam-asr --manifest test.jsonl      # {"audio": ..., "text"?: ...} lines

One JSON line per input, in input order: {"path", "text"} (plus "reference" when known), or {"path", "error"}
for an input that cannot be transcribed. A bad file never stops the run; the summary says how many failed.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

import data
from model import CONFIG_NAME, SlamASR, SlamASRConfig, load_backbones

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".opus", ".mp3"}


def collect_inputs(args):
    """Records {id, audio, text?} from files/folders, a manifest or a LibriSpeech split; plus index problems."""
    report = data.DataReport("inputs")
    records = []
    for item in args.inputs:
        path = Path(item)
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES) if path.is_dir() else [path]
        records += [dict(id=str(p), audio=str(p)) for p in files]
    if args.manifest:
        records += data.read_manifest(args.manifest, report, require_text=False)
    if args.librispeech_dir:
        records += data.index_librispeech(args.librispeech_dir, args.split, report)
    for r in records:
        if not r.get("text"):
            r.pop("text", None)  # no reference
    return records, report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="audio files (wav/flac/ogg/mp3, any rate and channel count) or folders")
    p.add_argument("--adapter", required=True, help="adapter directory written by finetune.py or save_adapter")
    p.add_argument("--output", help="JSON-lines output (default: print the lines)")
    p.add_argument("--manifest", help='JSON-lines manifest, {"audio": path, "text": reference (optional)} per line')
    p.add_argument("--librispeech_dir", help="LibriSpeech root; score the split named by --split")
    p.add_argument("--split", default="test-clean", help="LibriSpeech split folder(s), comma-separated")
    p.add_argument("--encoder", help="load the encoder from here instead of the name in the adapter's config")
    p.add_argument("--llm", help="load the LLM from here instead of the name in the adapter's config")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--num_beams", type=int, default=1, help="1 = greedy")
    p.add_argument("--max_duration", type=float, default=60.0,
                   help="inputs longer than this (seconds) are reported as errors, never silently cut")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="backbone dtype (default: float16 on CUDA, float32 otherwise)")
    args = p.parse_args(argv)
    if not (args.inputs or args.manifest or args.librispeech_dir):
        p.error("give audio files or folders, --manifest, or --librispeech_dir")
    return args


def load_model(args):
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if args.device.startswith("cuda") else None)
    backbones = {}
    if args.encoder or args.llm:
        config = SlamASRConfig.from_json_file(Path(args.adapter) / CONFIG_NAME)
        config.encoder, config.llm = args.encoder or config.encoder, args.llm or config.llm
        encoder, llm, tokenizer, feature_extractor = load_backbones(config, dtype)
        backbones = dict(encoder=encoder, llm=llm, tokenizer=tokenizer, feature_extractor=feature_extractor)
    model = SlamASR.load_adapter(args.adapter, torch_dtype=dtype, **backbones)
    return model.to(args.device).eval()


def transcribe_records(model, records, batch_size, max_new_tokens, num_beams, max_duration):
    """Fills each record's "hypothesis" or "error". Longest first, so that batches hold similar lengths."""
    for r in records:
        try:
            r["duration"] = data.audio_duration(r["audio"])
        except data.DataError as e:
            r["error"] = str(e)
        else:
            if r["duration"] > max_duration:
                r["error"] = f"{r['duration']:.1f} s is longer than --max_duration {max_duration:g} s; split it first"
    todo = sorted((r for r in records if "error" not in r), key=lambda r: r["duration"], reverse=True)
    with tqdm(total=len(todo), desc="transcribing", unit="file") as bar:
        for start in range(0, len(todo), batch_size):
            batch, audios, bad = data.load_clips(lambda r: data.read_audio(r["audio"], model.sampling_rate),
                                                 todo[start:start + batch_size])
            for r, reason in bad:
                r["error"] = reason
            if audios:
                texts = model.transcribe(audios, batch_size=len(audios), max_new_tokens=max_new_tokens,
                                         num_beams=num_beams)
                for r, text in zip(batch, texts):
                    r["hypothesis"] = text
            bar.update(len(todo[start:start + batch_size]))
    return records


def main(argv=None):
    args = parse_args(argv)
    records, report = collect_inputs(args)
    report.log()
    if not records:
        print("nothing to transcribe", file=sys.stderr)
        return 1
    model = load_model(args)
    transcribe_records(model, records, args.batch_size, args.max_new_tokens, args.num_beams, args.max_duration)

    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    for r in records:
        row = {"path": r["audio"]}
        row.update({"text": r["hypothesis"]} if "hypothesis" in r else {"error": r["error"]})
        if "text" in r:
            row["reference"] = r["text"]
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
    if args.output:
        out.close()

    failed = [r for r in records if "error" in r]
    print(f"transcribed {len(records) - len(failed)} of {len(records)} inputs; {len(failed)} failed"
          + (f" (see the error lines in {args.output})" if failed and args.output else ""), file=sys.stderr)
    scored = [r for r in records if "text" in r and "hypothesis" in r]
    if scored:
        s = data.word_error_rate([r["text"] for r in scored], [r["hypothesis"] for r in scored])
        print(f"WER {100 * s['wer']:.2f}% on {len(scored)} utterances, {s['words']} words: "
              f"{s['substitutions']} substitutions, {s['deletions']} deletions, {s['insertions']} insertions",
              file=sys.stderr)
    return 0 if len(failed) < len(records) else 1


if __name__ == "__main__":
    sys.exit(main())
