"""Sampling rules: greedy, temperature, top-k, top-p (wins over top-k), guidance, reproducibility."""
from __future__ import annotations

import pytest
import torch

from lm.sampling import (
    classifier_free_guidance,
    guide_batched,
    sample_next_token,
    sample_top_k,
    sample_top_p,
)


def _draws(logits: torch.Tensor, n: int, seed: int = 0, **kwargs) -> torch.Tensor:
    """``n`` independent draws from one row of logits, as a (n,) tensor."""
    batch = logits.expand(n, -1)
    return sample_next_token(batch, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_greedy_is_argmax():
    logits = torch.randn(3, 4, 50)
    assert torch.equal(sample_next_token(logits, use_sampling=False), logits.argmax(-1))
    assert torch.equal(sample_next_token(logits, temperature=0.0), logits.argmax(-1))
    assert sample_next_token(logits, use_sampling=False).shape == (3, 4)


def test_top_k_keeps_only_the_k_most_likely():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    draws = _draws(logits, 4000, top_k=3)
    assert set(draws.tolist()) == {0, 1, 2}
    # frequencies follow the renormalized top-3 probabilities
    probs = torch.softmax(logits[0, :3], -1)
    freq = torch.bincount(draws, minlength=6)[:3].float() / len(draws)
    assert torch.allclose(freq, probs, atol=0.03)
    assert set(_draws(logits, 200, top_k=1).tolist()) == {0}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    # mass before each token: 0, .5, .8, .95 -> with p = 0.7 tokens 0 and 1 are kept
    assert set(_draws(logits, 2000, top_p=0.7).tolist()) == {0, 1}
    assert set(_draws(logits, 2000, top_p=0.85).tolist()) == {0, 1, 2}
    assert set(_draws(logits, 200, top_p=1e-6).tolist()) == {0}


def test_top_p_wins_over_top_k():
    logits = torch.tensor([[1.0, 0.9, 0.8, -5.0]])
    assert set(_draws(logits, 2000, top_k=1, top_p=0.9).tolist()) == {0, 1, 2}
    assert set(_draws(logits, 200, top_k=1, top_p=0.0).tolist()) == {0}


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[1.0, 0.0]])
    cold = _draws(logits, 4000, temperature=0.25).float().mean()   # p(1) = 1/(1+e^4) ~ 0.018
    hot = _draws(logits, 4000, temperature=4.0).float().mean()     # p(1) = 1/(1+e^0.25) ~ 0.44
    assert cold < 0.04 and 0.38 < hot < 0.5


def test_generator_makes_sampling_reproducible():
    logits = torch.randn(8, 4, 64)
    a = sample_next_token(logits, top_k=20, generator=torch.Generator().manual_seed(3))
    b = sample_next_token(logits, top_k=20, generator=torch.Generator().manual_seed(3))
    c = sample_next_token(logits, top_k=20, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_direct_samplers_return_indices_of_the_input():
    probs = torch.softmax(torch.randn(5, 30), -1)
    gen = torch.Generator().manual_seed(0)
    for draw in (sample_top_k(probs, 7, gen), sample_top_p(probs, 0.5, gen)):
        assert draw.shape == (5,) and draw.dtype == torch.long
        assert ((draw >= 0) & (draw < 30)).all()
    # the nucleus sampler maps back through the sort: with a tiny p it is the argmax
    assert torch.equal(sample_top_p(probs, 1e-9, gen), probs.argmax(-1))


def test_classifier_free_guidance():
    cond, uncond = torch.randn(2, 4, 10), torch.randn(2, 4, 10)
    assert torch.allclose(classifier_free_guidance(cond, uncond, 3.0), uncond + 3 * (cond - uncond))
    assert torch.allclose(classifier_free_guidance(cond, uncond, 1.0), cond)
    assert torch.equal(guide_batched(torch.cat([cond, uncond]), 3.0), classifier_free_guidance(cond, uncond, 3.0))
    with pytest.raises(ValueError, match="even number"):
        guide_batched(torch.randn(3, 4, 10), 3.0)
    with pytest.raises(ValueError, match="differ in shape"):
        classifier_free_guidance(cond, uncond[:1], 3.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_p"):
        sample_next_token(torch.randn(2, 5), top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        sample_next_token(torch.randn(2, 5), top_k=-1)


def test_sampling_config_is_checked_when_made_and_replaced_by_name():
    from dataclasses import FrozenInstanceError

    from lm.sampling import SAMPLING_OPTIONS, GenerationArgumentError, SamplingConfig

    assert SAMPLING_OPTIONS == ("use_sampling", "temperature", "top_k", "top_p", "cfg_coef", "two_step_cfg")
    with pytest.raises(GenerationArgumentError, match="temperature must be > 0"):
        SamplingConfig(temperature=0.0)
    assert SamplingConfig(use_sampling=False, temperature=0.0).temperature == 0.0  # greedy: no temperature
    with pytest.raises(GenerationArgumentError, match="top_k"):
        SamplingConfig.from_options(top_k=-1)
    base = SamplingConfig(top_k=7)
    assert SamplingConfig.from_options(base) is base
    assert SamplingConfig.from_options(base, cfg_coef=1.0) == SamplingConfig(top_k=7, cfg_coef=1.0)
    with pytest.raises(TypeError, match="topk"):
        SamplingConfig.from_options(topk=5)
    with pytest.raises(FrozenInstanceError):
        base.top_k = 3
    assert SamplingConfig().guided and not SamplingConfig(cfg_coef=1.0).guided
