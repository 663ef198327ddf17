"""Codebook patterns: exact layouts, round trips, logits alignment, and transformers' delay mask."""
from __future__ import annotations

import pytest
import torch

from lm.patterns import (
    CoarseFirstPatternProvider,
    Coord,
    DelayPatternProvider,
    ParallelPatternProvider,
    Pattern,
    UnrolledPatternProvider,
    make_pattern_provider,
    stereo_delays,
)

S = -7  # special token used in these tests (distinct from every code)


def frame_codes(K: int, T: int) -> torch.Tensor:
    """Codes (1, K, T) whose value tells codebook and frame apart: 10 * k + t + 1."""
    return (10 * torch.arange(K)[:, None] + torch.arange(T)[None, :] + 1)[None]


def test_delay_layout_exact():
    provider = DelayPatternProvider(3)
    seq, mask = provider.get_pattern(4).build_sequence(frame_codes(3, 4), S)
    expected = torch.tensor([
        [S, 1, 2, 3, 4, S, S],
        [S, S, 11, 12, 13, 14, S],
        [S, S, S, 21, 22, 23, 24],
    ])[None]
    assert torch.equal(seq, expected)
    assert torch.equal(mask, expected[0] != S)


def test_delay_special_token_positions_musicgen():
    """MusicGen (K=4): codebook k of frame t sits at step 1 + t + k, nothing else is a code."""
    K, T = 4, 6
    pattern = DelayPatternProvider(K).get_pattern(T)
    assert pattern.num_steps == T + K  # 1 empty step + T frames + K-1 delay tail
    seq, mask = pattern.build_sequence(frame_codes(K, T), S)
    for k in range(K):
        for s in range(pattern.num_steps):
            t = s - 1 - k
            if 0 <= t < T:
                assert seq[0, k, s] == 10 * k + t + 1 and mask[k, s]
            else:
                assert seq[0, k, s] == S and not mask[k, s]


def test_stereo_delays():
    assert stereo_delays(4) == [0, 0, 1, 1, 2, 2, 3, 3]
    seq, _ = DelayPatternProvider(8, stereo_delays(4)).get_pattern(3).build_sequence(frame_codes(8, 3), S)
    for k in range(8):
        delay = k // 2
        assert seq[0, k, 1 + delay: 4 + delay].tolist() == [10 * k + 1, 10 * k + 2, 10 * k + 3]
        assert (seq[0, k, : 1 + delay] == S).all() and (seq[0, k, 4 + delay:] == S).all()


def test_parallel_layout():
    seq, mask = ParallelPatternProvider(2).get_pattern(3).build_sequence(frame_codes(2, 3), S)
    assert seq[0].tolist() == [[S, 1, 2, 3], [S, 11, 12, 13]]
    assert mask[:, 0].tolist() == [False, False] and mask[:, 1:].all()


def test_unrolled_layouts():
    # Fully flattened: one codebook per step, codebook 0 first within a frame.
    layout = UnrolledPatternProvider(3).layout(2)
    assert layout == [[], [Coord(0, 0)], [Coord(0, 1)], [Coord(0, 2)],
                      [Coord(1, 0)], [Coord(1, 1)], [Coord(1, 2)]]
    # flattening [0, 1, 1], delays [0, 3, 3]: the delayed pair is placed 3 steps later and,
    # at equal positions, before codebook 0 (audiocraft's ordering of ties).
    layout = UnrolledPatternProvider(3, flattening=[0, 1, 1], delays=[0, 3, 3]).layout(2)
    assert layout == [[], [Coord(0, 0)], [Coord(1, 0)], [Coord(2, 0)],
                      [Coord(0, 1), Coord(0, 2)], [Coord(3, 0)],
                      [Coord(1, 1), Coord(1, 2)], [Coord(4, 0)]]
    seq, _ = UnrolledPatternProvider(3, flattening=[0, 1, 1], delays=[0, 3, 3]).get_pattern(2) \
        .build_sequence(frame_codes(3, 2), S)
    assert seq[0].tolist() == [[S, 1, 2, S, S, S, S, S],
                               [S, S, S, S, 11, S, 12, S],
                               [S, S, S, S, 21, S, 22, S]]


def test_coarse_first_layout():
    layout = CoarseFirstPatternProvider(3, delays=[0, 1]).layout(2)
    assert layout == [[], [Coord(0, 0)], [Coord(1, 0)], [Coord(0, 1)],
                      [Coord(1, 1), Coord(0, 2)], [Coord(2, 1), Coord(1, 2)]]


PROVIDERS = [
    DelayPatternProvider(4),
    DelayPatternProvider(8, stereo_delays(4)),
    DelayPatternProvider(4, flatten_first=2, empty_initial=1),
    ParallelPatternProvider(4),
    UnrolledPatternProvider(4),
    UnrolledPatternProvider(4, flattening=[0, 1, 1, 2], delays=[0, 1, 1, 2]),
    CoarseFirstPatternProvider(4),
    CoarseFirstPatternProvider(4, delays=[0, 1, 2]),
]


@pytest.mark.parametrize("provider", PROVIDERS, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("T", [1, 5])
def test_round_trip(provider, T):
    K = provider.num_codebooks
    codes = torch.randint(0, 50, (3, K, T))
    pattern = provider.get_pattern(T)
    seq, mask = pattern.build_sequence(codes, S)
    assert seq.shape == (3, K, pattern.num_steps)
    # every code appears exactly once, and the mask marks exactly those places
    assert int(mask.sum()) == K * T
    assert ((seq != S) == mask[None]).all()
    back, back_mask = pattern.revert_sequence(seq, S)
    assert torch.equal(back, codes) and back_mask.all()


def test_keep_only_valid_steps_delay():
    K, T = 4, 5
    pattern = DelayPatternProvider(K).get_pattern(T)
    assert pattern.max_delay == K - 1 and pattern.num_valid_steps == T + 1
    seq, mask = pattern.build_sequence(frame_codes(K, T), S, keep_only_valid_steps=True)
    full, _ = pattern.build_sequence(frame_codes(K, T), S)
    assert torch.equal(seq, full[..., : T + 1])
    back, back_mask = pattern.revert_sequence(seq, S, keep_only_valid_steps=True)
    # the tail of codebook k (its last k frames) lies past the valid steps
    for k in range(K):
        assert back_mask[k].tolist() == [t < T - k for t in range(T)]
        assert (back[0, k][~back_mask[k]] == S).all()


@pytest.mark.parametrize("keep_only_valid_steps", [False, True])
def test_revert_logits_alignment_and_mask(keep_only_valid_steps):
    """Output step s predicts the code at step s + 1; codes without a prediction are NaN."""
    K, T, card = 4, 5, 3
    pattern = DelayPatternProvider(K).get_pattern(T)
    steps = pattern.num_valid_steps if keep_only_valid_steps else pattern.num_steps
    # logits[b, c, k, s] encodes (k, s) so the reverted position can be read back
    logits = (100 * torch.arange(K)[:, None] + torch.arange(steps)[None, :]).float()
    logits = logits[None, None].expand(2, card, K, steps).clone()
    out, mask = pattern.revert_logits(logits, keep_only_valid_steps=keep_only_valid_steps)
    assert out.shape == (2, card, K, T) and mask.shape == (K, T)
    for k in range(K):
        for t in range(T):
            s = t + k  # the code sits at step t + k + 1, predicted from step t + k
            if s + 1 < steps:
                assert mask[k, t] and (out[:, :, k, t] == 100 * k + s).all()
            else:
                assert not mask[k, t] and out[:, :, k, t].isnan().all()
    if not keep_only_valid_steps:
        assert mask.all()


def test_first_step_with_timestep():
    pattern = DelayPatternProvider(4).get_pattern(10)
    assert [pattern.first_step_with_timestep(t) for t in (0, 3, 9)] == [1, 4, 10]
    coarse = CoarseFirstPatternProvider(3).get_pattern(4)
    assert coarse.first_step_with_timestep(2) == 3


def test_shorter_codes_than_pattern():
    """Frames beyond the given codes become special tokens (audiocraft allows T <= timesteps)."""
    pattern = DelayPatternProvider(2).get_pattern(4)
    seq, mask = pattern.build_sequence(frame_codes(2, 2), S)
    assert seq[0].tolist() == [[S, 1, 2, S, S, S], [S, S, 11, 12, S, S]]
    assert int(mask.sum()) == 4


def test_errors():
    with pytest.raises(ValueError, match="ascending"):
        DelayPatternProvider(3, delays=[0, 2, 1])
    with pytest.raises(ValueError, match="3 entries"):
        DelayPatternProvider(3, delays=[0, 1])
    with pytest.raises(ValueError, match="different delays"):
        UnrolledPatternProvider(3, flattening=[0, 1, 1], delays=[0, 1, 2])
    with pytest.raises(ValueError, match="empty step"):
        Pattern([[Coord(0, 0)]], num_codebooks=1, timesteps=1)
    with pytest.raises(ValueError, match="back in time"):
        Pattern([[], [Coord(1, 0)], [Coord(0, 0)]], num_codebooks=1, timesteps=2)
    with pytest.raises(ValueError, match="same codebook twice"):
        Pattern([[], [Coord(0, 0), Coord(1, 0)]], num_codebooks=1, timesteps=2)
    pattern = DelayPatternProvider(4).get_pattern(3)
    with pytest.raises(ValueError, match=r"\(B, 4, L\)"):
        pattern.build_sequence(torch.zeros(1, 3, 3, dtype=torch.long), S)
    with pytest.raises(ValueError, match="built for 3"):
        pattern.build_sequence(torch.zeros(1, 4, 5, dtype=torch.long), S)
    with pytest.raises(ValueError, match="unknown codebook pattern"):
        make_pattern_provider("musiclm", 4)


def test_provider_caches_patterns():
    provider = make_pattern_provider("delay", 4, delays=[0, 1, 2, 3])
    assert provider.get_pattern(7) is provider.get_pattern(7)


@pytest.mark.parametrize("audio_channels", [1, 2])
def test_delay_matches_transformers_delay_mask(audio_channels):
    """transformers' MusicGen builds the same interleaved sequence (its pad = our special token)."""
    transformers = pytest.importorskip("transformers")
    K, T, card = 4 * audio_channels, 6, 16
    config = transformers.MusicgenDecoderConfig(
        vocab_size=card, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, ffn_dim=8,
        num_codebooks=K, audio_channels=audio_channels, pad_token_id=card, bos_token_id=card)
    decoder = transformers.MusicgenForCausalLM(config)
    codes = torch.randint(0, card, (2, K, T))
    with_bos = torch.cat([torch.full((2, K, 1), card), codes], dim=-1).reshape(2 * K, T + 1)
    max_length = T + 1 + (K // audio_channels) - 1
    _, pattern_mask = decoder.build_delay_pattern_mask(with_bos, pad_token_id=card, max_length=max_length)
    delays = list(range(K)) if audio_channels == 1 else stereo_delays(K // 2)
    ours, _ = DelayPatternProvider(K, delays).get_pattern(T).build_sequence(codes, card)
    assert torch.equal(pattern_mask.reshape(2, K, -1), ours)
