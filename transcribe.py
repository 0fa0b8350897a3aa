"""
Batch inference with a trained adapter, and WER when references are known.

    python transcribe.py --adapter out/slam-asr FILES_OR_FOLDERS... --output preds.jsonl
    python transcribe.py --adapter out/slam-asr --librispeech_dir /data/LibriSpeech --split test-clean
    python transcribe.py --adapter out/slam-asr --manifest test.jsonl      # {"audio": ..., "text"?: ...} lines
    python transcribe.py --rescore out/slam-asr/predictions_step2000.jsonl --normalizer simple   # no decoding

One JSON line per input: {"path", "text"} (plus "reference" when known), or {"path", "error"} for an input
that cannot be transcribed. A bad file never stops the run; the summary says how many failed. An input longer
than --chunk_seconds is cut into windows at quiet points, which are transcribed in the batches of the other
clips and joined into its one line, with the "cuts" (seconds) where it was cut. --max_duration, when given,
makes longer inputs error lines.

Each line is written (and flushed) as its batch finishes (a long input's when its last window does), so a crash
or a kill keeps what was done, in the order it was done: unreadable inputs first, then roughly longest to
shortest. A run that finishes rewrites --output in input order (atomically). `--resume` skips the inputs whose
path already has a line in --output and appends the rest; an existing non-empty --output is refused without
--resume or --overwrite. The summary and WER count every line in --output, resumed ones included; a long
input is one utterance.
"""

import argparse
import gc
import heapq
import itertools
import json
import os
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

import data
from backbones import load_backbones
from model import CONFIG_NAME, GENERATION_CONFIG_NAME, SlamASR, SlamASRConfig, resolve_adapter_dir
from processor import write_text_atomic

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
    p.add_argument("--adapter",
                   help="adapter folder written by finetune.py or save_adapter, or a hub repo id holding one")
    p.add_argument("--rescore", metavar="JSONL", help="score the reference/hypothesis (or text) lines of an earlier "
                   "output or a finetune.py predictions file again, without decoding")
    p.add_argument("--normalizer", default="whisper", choices=list(data.WER_NORMALIZERS),
                   help="text normalization before WER: 'whisper' (Whisper's English normalizer, what published "
                        "LibriSpeech figures use) or 'simple' (lower case, no punctuation)")
    p.add_argument("--output", help="JSON-lines output (default: print the lines)")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true",
                          help="skip the inputs whose path already has a line in --output (error lines too: delete "
                               "those to retry them) and append the rest")
    existing.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--manifest", help='JSON-lines manifest, {"audio": path, "text": reference (optional)} per line')
    p.add_argument("--librispeech_dir", help="LibriSpeech root; score the split named by --split")
    p.add_argument("--split", default="test-clean", help="LibriSpeech split folder(s), comma-separated")
    p.add_argument("--encoder", help="load the encoder from here instead of the name in the adapter's config")
    p.add_argument("--llm", help="load the LLM from here instead of the name in the adapter's config")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, help="most new tokens per clip (default: the adapter's "
                   "generation_config.json, 200)")
    p.add_argument("--num_beams", type=int, help="1 = greedy (default: the adapter's generation_config.json, 1)")
    p.add_argument("--max_new_tokens_per_second", type=float,
                   help="new tokens allowed per second of audio, plus 10 (default: the adapter's, 15); 0 = no bound")
    p.add_argument("--chunk_seconds", type=float, default=30.0,
                   help="inputs longer than this (seconds) are cut into windows of at most this length, each at the "
                        "quietest point of its last 5 s, transcribed with the other clips and joined into one line")
    p.add_argument("--max_duration", type=float, default=None,
                   help="inputs longer than this (seconds) are reported as errors, not transcribed (default: no limit)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="backbone dtype (default: float16 on CUDA, float32 otherwise)")
    p.add_argument("--attn_implementation", choices=["eager", "sdpa", "flash_attention_2"], default=None,
                   help="attention kernel of both backbones (default: transformers' choice, sdpa)")
    args = p.parse_args(argv)
    if args.rescore:
        return args
    if not args.adapter:
        p.error("--adapter is required (or --rescore, to score an earlier output again)")
    if not (args.inputs or args.manifest or args.librispeech_dir):
        p.error("give audio files or folders, --manifest, or --librispeech_dir")
    for name in ("batch_size", "max_new_tokens", "num_beams"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.max_duration is not None and not args.max_duration > 0:
        p.error(f"--max_duration must be a positive number of seconds (got {args.max_duration})")
    if not 1 <= args.chunk_seconds < float("inf"):
        p.error(f"--chunk_seconds must be at least 1 second (got {args.chunk_seconds})")
    problem = output_problem(args)
    if problem:
        p.error(problem)
    return args


def output_problem(args):
    """What is wrong with --output, checked before anything loads (an hour of model loading and decoding is
    not spent on a run that cannot write its results), or None."""
    if not args.output:
        return f"--{'resume' if args.resume else 'overwrite'} needs --output" if args.resume or args.overwrite else None
    out = Path(args.output).resolve()
    if out in {Path(p).resolve() for p in [*args.inputs, args.manifest] if p}:
        return f"--output {args.output} is one of the inputs: it would be overwritten; name another file"
    if out.is_dir():
        return f"--output {args.output} is a folder; name a file in it, such as {Path(args.output) / 'preds.jsonl'}"
    if not out.parent.is_dir():
        return f"--output {args.output}: the folder {out.parent} does not exist; create it first"
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        return f"--output {args.output}: not writable here; choose another place"
    if out.exists() and out.stat().st_size > 0 and not (args.resume or args.overwrite):
        return (f"--output {args.output} exists and is not empty: --resume continues it (skipping the inputs "
                "it has), --overwrite replaces it")
    return None


def read_output(path):
    """The lines already in --output, for --resume. A last line without its newline was cut short by a kill: it
    is removed (its input is transcribed again)."""
    if not os.path.exists(path):
        return []
    text = Path(path).read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        kept = text[: text.rfind("\n") + 1]
        print(f"{path}: removing its last line, cut short: {text[len(kept):][:80]!r}", file=sys.stderr)
        with open(path, "r+", encoding="utf-8") as f:
            f.truncate(len(kept.encode("utf-8")))
        text = kept
    rows = []
    for lineno, line in enumerate(text.split("\n")[:-1], 1):  # not splitlines: a hypothesis may hold U+2028
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("path"), str):
            raise SystemExit(f"{path}:{lineno} is not a line transcribe.py writes ({line[:80]!r}); fix or delete "
                             "it, or use --overwrite to start over")
        rows.append(row)
    return rows


def load_model(args):
    """The adapter's model, with --encoder/--llm as the backbones where given and the decoding flags given."""
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if args.device.startswith("cuda") else None)
    adapter = resolve_adapter_dir(args.adapter)
    backbones = {}
    if args.encoder or args.llm:
        config = SlamASRConfig.from_json_file(Path(adapter) / CONFIG_NAME)
        config.encoder, config.llm = args.encoder or config.encoder, args.llm or config.llm
        encoder, llm, tokenizer, feature_extractor = load_backbones(config, dtype,
                                                                    attn_implementation=args.attn_implementation)
        backbones = dict(encoder=encoder, llm=llm, tokenizer=tokenizer, feature_extractor=feature_extractor)
    model = SlamASR.load_adapter(adapter, torch_dtype=dtype, attn_implementation=args.attn_implementation, **backbones)
    given = {name: getattr(args, name) for name in ("max_new_tokens", "num_beams", "max_new_tokens_per_second")
             if getattr(args, name) is not None}
    model.generation_config.update(**given)
    return model.to(args.device).eval()


def decoding(args, model=None):
    """How the WER was decoded, for the line that reports it: the model's options, or where every line was there
    already (--resume), the adapter's generation_config.json with the flags given."""
    if model is not None:
        beams = model.generation_config.num_beams
    else:
        saved = Path(resolve_adapter_dir(args.adapter)) / GENERATION_CONFIG_NAME
        beams = args.num_beams or (json.loads(saved.read_text()).get("num_beams", 1) if saved.is_file() else 1)
    return data.decoding_name(beams)


def transcribe_records(model, records, batch_size, max_duration=None, chunk_seconds=30.0):
    """Yields lists of finished records, each with its "hypothesis" or "error": first the inputs whose header
    cannot be read or that are over max_duration, then, batch by batch, the inputs that batch finished.

    An input longer than chunk_seconds is transcribed as windows cut at quiet points (data.quiet_cuts); its
    hypothesis is theirs joined in order, and it is finished (its line written) only when its last window is.
    Clips and windows go through one queue, longest first, so that batches hold similar lengths; a long input
    waits in it with the length of its shortest full window (chunk_seconds - data.CUT_SEARCH_SECONDS), and is
    read and cut only when that comes up: its windows are then queued by their own lengths. So a long file is
    read once, and its audio is held only until its windows are decoded (mostly by the next batches; the last
    window, often short, waits for the clips of its length), never every long file at once."""
    for r in records:
        try:
            r["duration"] = data.audio_duration(r["audio"])
        except data.DataError as e:
            r["error"] = str(e)
        else:
            if max_duration is not None and r["duration"] > max_duration:
                r["error"] = f"{r['duration']:.1f} s is longer than --max_duration {max_duration:g} s"
    failed = [r for r in records if "error" in r]
    if failed:
        yield failed
    todo = [r for r in records if "error" not in r]
    rate = model.sampling_rate
    # (-seconds, order, clip): a clip is {"input": record}, read when batched, or a long input's window
    # {"input", "window": index, "audio"}; the order number keeps ties in input order
    waits_as = max(chunk_seconds - data.CUT_SEARCH_SECONDS, 0)  # a long input's place: its shortest full window
    queue = [(-(r["duration"] if r["duration"] <= chunk_seconds else waits_as), i, {"input": r})
             for i, r in enumerate(todo)]
    heapq.heapify(queue)
    order = itertools.count(len(queue))
    def load(clip):
        return clip["audio"] if "window" in clip else data.read_audio(clip["input"]["audio"], rate)

    with tqdm(total=len(todo), desc="transcribing", unit="input", disable=not todo) as bar:
        while queue:
            batch, finished = [], []
            while queue and len(batch) < batch_size:
                clip = heapq.heappop(queue)[2]
                r = clip["input"]
                if "window" in clip or r["duration"] <= chunk_seconds:
                    batch.append(clip)
                    continue
                try:  # a long input's turn: read it once, queue its windows
                    audio = data.read_audio(r["audio"], rate)
                except data.DataError as e:
                    r["error"] = str(e)
                    finished.append(r)
                    continue
                cuts = data.quiet_cuts(audio, rate, chunk_seconds)
                r["windows"] = [None] * len(cuts)  # their texts, as they come
                r["cuts"] = [round(end / rate, 2) for _, end in cuts[:-1]]
                for k, (start, end) in enumerate(cuts):
                    # views of the file's audio, freed with the full windows in the next batches; the last window
                    # is copied, as it may wait for the short clips and should not keep the whole file meanwhile
                    samples = audio[start:end] if k < len(cuts) - 1 else audio[start:end].copy()
                    window = {"input": r, "window": k, "audio": samples}
                    heapq.heappush(queue, (-(end - start) / rate, next(order), window))
                del audio  # from here only its windows hold it
            loaded, audios, bad = data.load_clips(load, batch)
            for clip, reason in bad:  # only inputs read here: windows are in memory already
                clip["input"]["error"] = reason
                finished.append(clip["input"])
            texts = model.generate(**model.processor(audios=audios).to(model.device)) if audios else []
            for clip, text in zip(loaded, texts):
                r = clip["input"]
                if "window" not in clip:
                    r["hypothesis"] = text
                    finished.append(r)
                    continue
                r["windows"][clip["window"]] = text
                if all(t is not None for t in r["windows"]):
                    r["hypothesis"] = " ".join(t for t in r.pop("windows") if t)  # a silent window gives ""
                    finished.append(r)
            bar.update(len(finished))
            yield finished


def output_row(record):
    row = {"path": record["audio"]}
    row.update({"text": record["hypothesis"]} if "hypothesis" in record else {"error": record["error"]})
    if record.get("cuts") and "hypothesis" in record:
        row["cuts"] = record["cuts"]  # seconds at which a long input was cut into windows
    if "text" in record:
        row["reference"] = record["text"]
    return row


def write_in_input_order(path, rows, records):
    """Rewrites --output with its lines in input order (lines for paths that are not inputs of this run, from
    an earlier --resume'd run, last), written atomically: a kill leaves one whole file."""
    order = {}
    for i, r in enumerate(records):
        order.setdefault(r["audio"], i)
    rows = sorted(rows, key=lambda row: order.get(row["path"], len(records)))  # stable: repeats keep their order
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def summarize(rows, output, decoded, normalizer):
    """The summary line and WER, over every line of the output (resumed ones included); the exit code."""
    failed = sum("error" in row for row in rows)
    print(f"transcribed {len(rows) - failed} of {len(rows)} inputs; {failed} failed"
          + (f" (see the error lines in {output})" if failed and output else ""), file=sys.stderr)
    scored = [row for row in rows if "reference" in row and "text" in row]
    if scored:
        s = data.word_error_rate([row["reference"] for row in scored], [row["text"] for row in scored], normalizer)
        print(f"{data.wer_line(s, decoded)}; {len(scored)} utterances", file=sys.stderr)
    return 0 if failed < len(rows) else 1


def rescore(path, normalizer):
    """WER of an earlier output's or a predictions file's lines, with no model: the figure again, under
    another normalizer, say."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]
    scored = [row for row in rows if isinstance(row, dict) and isinstance(row.get("reference"), str)
              and isinstance(row.get("hypothesis", row.get("text")), str)]
    if not scored:
        print(f"{path}: no line with a reference and a hypothesis (or text) to score", file=sys.stderr)
        return 1
    s = data.word_error_rate([r["reference"] for r in scored], [r.get("hypothesis", r.get("text")) for r in scored],
                             normalizer)
    print(f"{data.wer_line(s)}; {len(scored)} utterances of {len(rows)} lines in {path}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.rescore:
        return rescore(args.rescore, args.normalizer)
    records, report = collect_inputs(args)
    report.log()
    if not records:
        print("nothing to transcribe", file=sys.stderr)
        return 1
    rows = read_output(args.output) if args.resume else []
    done = {row["path"] for row in rows}
    todo = [r for r in records if r["audio"] not in done]
    if args.resume:
        print(f"{args.output}: {len(rows)} lines already there; {len(todo)} of {len(records)} inputs to go",
              file=sys.stderr)

    if todo:
        model = load_model(args)
        out = open(args.output, "a" if args.resume else "w", encoding="utf-8") if args.output else sys.stdout
        try:
            for finished in transcribe_records(model, todo, args.batch_size, args.max_duration, args.chunk_seconds):
                for r in finished:
                    rows.append(output_row(r))
                    out.write(json.dumps(rows[-1], ensure_ascii=False) + "\n")
                out.flush()
        except KeyboardInterrupt:
            print(f"interrupted: {len(rows)} lines are in {args.output or 'the output above'}"
                  + ("; the same command with --resume goes on from there" if args.output else ""), file=sys.stderr)
            return 130
        finally:
            if args.output:
                out.close()
    if args.output:
        write_in_input_order(args.output, rows, records)
    return summarize(rows, args.output, decoding(args, model if todo else None), args.normalizer)


if __name__ == "__main__":
    code = main()
    gc.freeze()  # skip the interpreter's last full garbage collection (1.2 s; see finetune.py)
    sys.exit(code)
