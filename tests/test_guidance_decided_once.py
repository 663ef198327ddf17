"""Guidance is decided once, by :attr:`lm.sampling.SamplingConfig.guided`: the generator builds the
``[conditional; unconditional]`` rows from it and tells the LM (``guided=``), which only checks
the row count against what it is told (issue 12)."""
from __future__ import annotations

import pytest
import torch
from test_generator import DIM, build_tiny_generator, tiny_lm

from conditioning.fuser import ConditionFuser, FuserConfig
from inference.generator import MusicGen


def _rows(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    condition = torch.randn(n, 3, DIM, generator=torch.Generator().manual_seed(n))
    return condition, torch.ones(n, 3, dtype=torch.long)


@pytest.mark.parametrize(("guided", "rows", "wanted"), [(True, 2, "4 rows"), (False, 4, "2 rows")])
def test_lm_refuses_rows_that_disagree_with_guided(guided, rows, wanted):
    condition, mask = _rows(rows)
    with pytest.raises(ValueError, match=wanted):
        tiny_lm().generate(max_gen_len=3, num_samples=2, condition=condition, condition_mask=mask,
                           guided=guided, use_sampling=False)


def test_lm_refuses_guided_without_rows():
    with pytest.raises(ValueError, match="guided generation needs condition or prefix rows"):
        tiny_lm().generate(max_gen_len=3, num_samples=2, guided=True, use_sampling=False)


def test_guided_given_or_read_from_the_rows_gives_the_same_tokens():
    lm = tiny_lm()
    for guided, rows in ((True, 4), (False, 2)):
        condition, mask = _rows(rows)
        kwargs = dict(max_gen_len=5, num_samples=2, condition=condition, condition_mask=mask,
                      use_sampling=False)
        assert torch.equal(lm.generate(**kwargs, guided=guided), lm.generate(**kwargs))


@pytest.mark.parametrize(("cfg_coef", "guided"), [(3.0, True), (1.0, False)])
def test_generator_tells_the_lm_what_sampling_decided(monkeypatch, cfg_coef, guided):
    generator = build_tiny_generator()
    seen = []
    original = generator.lm.generate_iter

    def spy(**kwargs):
        seen.append((kwargs["guided"], kwargs["condition"].shape[0]))
        return original(**kwargs)

    monkeypatch.setattr(generator.lm, "generate_iter", spy)
    generator.generate(["happy", "calm"], 0.05, cfg_coef=cfg_coef, use_sampling=False)
    assert seen == [(guided, 4 if guided else 2)]


def test_a_model_whose_text_is_ignored_is_not_guided():
    """Nothing reaches the LM (the fuser ignores the text): no rows to guide with, so no guidance."""
    reference = build_tiny_generator()
    bare = MusicGen(lm=reference.lm, codec=reference.codec, condition_provider=reference.condition_provider,
                    fuser=ConditionFuser(FuserConfig(cross=(), ignore=("description",))),
                    config=reference.config)
    conditions = bare.prepare_conditions(["happy", None], guided=True)
    assert conditions.guided is False and conditions.condition is None and conditions.prefix is None
    assert bare.generate(["happy", None], 0.05, use_sampling=False, return_tokens=True).tokens.shape[0] == 2
