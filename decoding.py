"""
How transcripts are decoded: transformers' own GenerationConfig for what the library knows (beams, new-token
budget, EOS), and our two bounds on a young adapter's LLM (`DecodingBounds`): a cap on new tokens per second of
audio, and a stop on looping output. Both are saved beside the adapter (generation_config.json,
decoding_bounds.json), and every command line changes them through `with_overrides`, checked once there.
"""

import json
import math
import os
from dataclasses import asdict, dataclass, fields

import torch
from transformers import LogitsProcessor

BOUNDS_NAME = "decoding_bounds.json"
MAX_NEW_TOKENS = 200  # tokens per hypothesis at most, where an adapter's generation_config.json says none
MAX_NEW_TOKENS_PER_SECOND = 15.0  # read speech is 2-4 words, 3-6 Llama tokens a second: room to spare
STOP_REPEATS = 4  # a run of 1-8 tokens repeated this often in a row (12 tokens at least) is a loop


@dataclass(frozen=True)
class DecodingBounds:
    """`max_new_tokens_per_second`: a hypothesis ends once it holds this many tokens per second of its audio plus
    10 (0: no such bound). `stop_repeats`: it ends once the same run of 1-8 tokens comes this many times in a row
    (0: never)."""

    max_new_tokens_per_second: float = MAX_NEW_TOKENS_PER_SECOND
    stop_repeats: int = STOP_REPEATS

    def __post_init__(self):
        rate = self.max_new_tokens_per_second
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (math.isfinite(rate) and rate >= 0):
            raise ValueError(f"max_new_tokens_per_second must be a finite number >= 0 (0: no bound), got {rate!r}")
        if isinstance(self.stop_repeats, bool) or not isinstance(self.stop_repeats, int) or self.stop_repeats < 0:
            raise ValueError(f"stop_repeats must be an integer >= 0 (0: never), got {self.stop_repeats!r}")

    def to_json_string(self):
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def load(cls, directory):
        """The bounds saved in `directory`, or the defaults where none were saved (an adapter from before them)."""
        path = os.path.join(directory, BOUNDS_NAME)
        if not os.path.isfile(path):
            return cls()
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
            known = {f.name for f in fields(cls)}
            if not isinstance(values, dict) or set(values) - known:
                raise ValueError(f"it should hold an object with the fields {sorted(known)}")
            return cls(**values)
        except ValueError as e:  # json's errors are ValueErrors too
            raise ValueError(f"{path}: {e}") from None

    def logits_processor(self, seconds, eos_token_id):
        """The processor that applies these bounds to rows of `seconds` (B*beams,) of audio each."""
        return BoundedDecoding(seconds, self.max_new_tokens_per_second, self.stop_repeats, eos_token_id)


class BoundedDecoding(LogitsProcessor):
    """Ends a hypothesis with EOS once it is as long as its clip can hold (`tokens_per_second` of audio plus 10
    tokens, EOS included) or once it loops (the same run of 1-8 tokens `stop_repeats` times in a row): small chat LLMs
    under a young adapter ramble, repeat themselves or answer something else, and max_new_tokens alone lets
    each such clip cost a whole budget. `seconds` (B*beams,) is each row's audio duration."""

    def __init__(self, seconds, tokens_per_second, stop_repeats, eos_token_id):
        self.max_tokens = None if not tokens_per_second else (seconds * tokens_per_second).ceil().long() + 10
        self.stop_repeats = stop_repeats
        self.eos = eos_token_id if isinstance(eos_token_id, int) else eos_token_id[0]

    def __call__(self, input_ids, scores):
        # input_ids (B*beams, new tokens so far): with inputs_embeds, generate passes the continuation only
        rows, n = input_ids.shape
        stop = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
        if self.max_tokens is not None:
            stop |= n + 1 >= self.max_tokens.to(input_ids.device)  # the EOS is the last of them
        for period in range(1, 9) if self.stop_repeats else ():
            span = period * max(self.stop_repeats, -(-12 // period))
            if n >= span:
                tail = input_ids[:, -span:].reshape(rows, -1, period)  # (rows, repeats, period)
                stop |= (tail == tail[:, :1]).all(dim=2).all(dim=1)
        scores[stop] = torch.finfo(scores.dtype).min
        scores[stop, self.eos] = 0.0
        return scores


def with_overrides(generation_config, bounds, max_new_tokens=None, num_beams=None, max_new_tokens_per_second=None,
                   stop_repeats=None):
    """(GenerationConfig, DecodingBounds) with the options given (None: keep), each checked: how every command
    line sets the decoding."""
    import copy
    from dataclasses import replace

    for name, value in (("max_new_tokens", max_new_tokens), ("num_beams", num_beams)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    generation_config = copy.deepcopy(generation_config)
    generation_config.update(**{k: v for k, v in dict(max_new_tokens=max_new_tokens, num_beams=num_beams).items()
                                if v is not None})
    changes = {k: v for k, v in dict(max_new_tokens_per_second=max_new_tokens_per_second,
                                     stop_repeats=stop_repeats).items() if v is not None}
    return generation_config, replace(bounds, **changes)


def decoding_name(num_beams):
    """How a hypothesis was decoded, as every WER line and the model card name it."""
    return "greedy" if num_beams == 1 else f"beam search, {num_beams} beams"
