"""Decoding bounds and options (decoding.py)."""

import numpy as np
import torch
from conftest import make_model

from decoding import BoundedDecoding


def test_decoding_is_bounded_by_the_clips_duration(train_clips):
    audios, _ = train_clips
    fresh = make_model(seed=1)  # an untrained adapter: the LLM rambles on
    lengths, generate = [], fresh.llm.generate
    fresh.llm.generate = lambda **kw: (lambda out: (lengths.append(out.shape[1]), out)[1])(generate(**kw))
    short = min(audios, key=len)
    fresh.transcribe([short], max_new_tokens=200)
    fresh.transcribe([short], max_new_tokens=200, max_new_tokens_per_second=0, stop_repeats=0)
    assert lengths[0] <= int(np.ceil(len(short) / 16000 * 15)) + 10 < lengths[1]


def test_looping_hypotheses_are_ended():
    eos = 2
    loop = torch.tensor([[5, 6, 7] + [8, 9] * 6])  # a run of 2 tokens, 6 times in a row
    varied = torch.tensor([list(range(10, 25))])
    for ids, ends in ((loop, True), (varied, False)):
        scores = BoundedDecoding(torch.tensor([10.0]), 15.0, 4, eos)(ids, torch.zeros(1, 30))
        assert (scores[0].argmax().item() == eos and scores[0, 3].item() < -1e30) == ends
    long_enough = BoundedDecoding(torch.tensor([0.5]), 15.0, 4, eos)  # 0.5 s: ceil(7.5) + 10 = 18 tokens with EOS
    assert long_enough(torch.arange(16)[None], torch.zeros(1, 30))[0].argmax().item() != eos
    assert long_enough(torch.arange(17)[None], torch.zeros(1, 30))[0].argmax().item() == eos
