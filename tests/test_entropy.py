"""The entropy-coding LM and arithmetic coder against the original `encodec` package.

Compatibility here means bitwise: the quantized CDFs floor probabilities at 1e-8 in float32,
so the LM must reproduce the reference's streaming probabilities bit for bit, and the coder
its bytes exactly.
"""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from codec.arithmetic import (MIN_RANGE, TOTAL_RANGE_BITS, ArithmeticDecoder, ArithmeticEncoder,
                              EntropyDecodingError, max_symbols_for_bits, quantized_cdf)
from codec.entropy_lm import EntropyLM
from oracles import import_encodec

encodec = import_encodec()
from encodec.model import LMModel  # noqa: E402
from encodec.quantization.ac import (ArithmeticCoder as RefCoder,  # noqa: E402
                                     ArithmeticDecoder as RefDecoder,
                                     build_stable_quantized_cdf)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_pdfs(count: int, card: int, seed: int) -> torch.Tensor:
    """Softmaxes from flat to very peaked, float32 `(count, card)`."""
    gen = torch.Generator().manual_seed(seed)
    temperature = torch.logspace(-1, 1.5, count).view(-1, 1)
    return torch.softmax(torch.randn(count, card, generator=gen) * temperature, dim=-1)


# -- quantized CDF ---------------------------------------------------------------------
@pytest.mark.parametrize("card", [2, 3, 1024, 2048])
def test_quantized_cdf_matches_reference(card):
    pdfs = random_pdfs(64, card, seed=card)
    ours = quantized_cdf(pdfs)
    for pdf, row in zip(pdfs, ours):
        ref = build_stable_quantized_cdf(pdf, TOTAL_RANGE_BITS, check=False)
        assert np.array_equal(row, ref.numpy())
    assert (np.diff(ours, axis=-1) >= MIN_RANGE).all()
    if card >= 1024:  # float32 rounding up of p can overshoot 2**24 by one for tiny cards
        assert (ours[:, -1] <= 2 ** TOTAL_RANGE_BITS).all()


def test_quantized_cdf_of_strided_lm_output_and_edge_cases():
    # The reference reads `probas[0, :, k, 0]`, a strided view of the LM output.
    probas = torch.softmax(torch.randn(1, 1024, 8, 1) * 4, dim=1)
    ours = quantized_cdf(probas[0, :, :, 0].T.contiguous())
    for k in range(8):
        assert np.array_equal(ours[k], build_stable_quantized_cdf(probas[0, :, k, 0], 24).numpy())
    one_hot = torch.zeros(1024)
    one_hot[7] = 1.0
    for pdf in (one_hot, torch.zeros(1024), torch.full((1024,), 1 / 1024)):
        assert np.array_equal(quantized_cdf(pdf), build_stable_quantized_cdf(pdf, 24).numpy())
    with pytest.raises(TypeError, match="float32"):
        quantized_cdf(np.ones(4))


# -- arithmetic coder ------------------------------------------------------------------
def coding_case(seed: int, steps: int, card: int):
    """CDFs from random pdfs and symbols drawn mostly from them, sometimes the least likely."""
    pdfs = random_pdfs(steps, card, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    symbols = torch.multinomial(pdfs, 1, generator=gen)[:, 0]
    rare = torch.rand(steps, generator=gen) < 0.05
    symbols = torch.where(rare, pdfs.argmin(dim=-1), symbols).tolist()
    return pdfs, quantized_cdf(pdfs), symbols


def reference_bytes(pdfs, symbols) -> bytes:
    buffer = io.BytesIO()
    coder = RefCoder(buffer)
    for pdf, symbol in zip(pdfs, symbols):
        coder.push(symbol, build_stable_quantized_cdf(pdf, coder.total_range_bits, check=False))
    coder.flush()
    return buffer.getvalue()


@pytest.mark.parametrize("seed,steps,card", [(0, 600, 1024), (1, 400, 7), (2, 300, 2048),
                                             (3, 1, 1024), (4, 50, 2)])
def test_arithmetic_coder_bytes_match_reference_both_ways(seed, steps, card):
    pdfs, cdfs, symbols = coding_case(seed, steps, card)
    ref = reference_bytes(pdfs, symbols)

    coder = ArithmeticEncoder()
    for start in range(0, steps, 37):  # pushing in runs or one by one is the same stream
        rows = range(start, min(start + 37, steps))
        coder.push_bounds([int(cdfs[i, symbols[i] - 1]) if symbols[i] else 0 for i in rows],
                          [int(cdfs[i, symbols[i]]) for i in rows])
    ours = coder.finish()
    assert ours == ref

    single = ArithmeticEncoder()
    for cdf, symbol in zip(cdfs.tolist(), symbols):
        single.push(symbol, cdf)
    assert single.finish() == ref

    for rows in (cdfs.tolist(), cdfs):  # lists or int64 arrays
        decoder = ArithmeticDecoder(ref)
        assert decoder.pull_many(rows) == symbols
        assert decoder.position == len(ref)  # consumed exactly the coder's bytes

    ref_decoder = RefDecoder(io.BytesIO(ours))
    for pdf, symbol in zip(pdfs, symbols):
        assert ref_decoder.pull(build_stable_quantized_cdf(pdf, 24, check=False)) == symbol


def test_decoder_reads_from_an_offset_and_stops_at_its_end():
    pdfs, cdfs, symbols = coding_case(5, 200, 1024)
    coded = reference_bytes(pdfs, symbols)
    data = b"\x01\x02\x03" + coded + b"tail"
    decoder = ArithmeticDecoder(data, offset=3)
    assert [decoder.pull(cdf) for cdf in cdfs.tolist()] == symbols
    assert decoder.position == 3 + len(coded)


def test_decoder_errors_on_truncated_or_impossible_bits():
    pdfs, cdfs, symbols = coding_case(6, 300, 1024)
    coded = reference_bytes(pdfs, symbols)
    with pytest.raises(EntropyDecodingError, match="ended early"):
        ArithmeticDecoder(coded[: len(coded) // 2]).pull_many(cdfs.tolist())
    # Two symbols covering 4 of the 2**24 values: all-ones bits land past the last one.
    with pytest.raises(EntropyDecodingError, match="beyond the last"):
        ArithmeticDecoder(b"\xff" * 8).pull([2, 4])
    with pytest.raises(ValueError, match="outside"):
        ArithmeticEncoder().push(5, [2, 4])


def test_random_bits_decode_or_raise_like_the_reference():
    """Garbage input: we fail exactly where the reference fails, else decode the same."""
    cdfs = quantized_cdf(random_pdfs(40, 16, seed=7))
    rng = random.Random(0)
    for _ in range(50):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        ref_decoder = RefDecoder(io.BytesIO(data))
        expected = []
        for cdf in cdfs:
            try:
                symbol = ref_decoder.pull(torch.from_numpy(cdf))
            except RuntimeError:  # "Binary search failed"
                symbol = "error"
            expected.append(symbol)
            if symbol is None or symbol == "error":
                break
        decoder = ArithmeticDecoder(data)
        got = []
        for cdf in cdfs[: len(expected)].tolist():
            try:
                got.append(decoder.pull(cdf))
            except EntropyDecodingError as error:
                got.append(None if "ended early" in str(error) else "error")
                break
        assert got == expected


def test_max_symbols_for_bits_bounds_real_streams():
    # The most skewed CDF possible: one symbol holds all but the minimum of the others.
    card = 1024
    pdf = torch.zeros(card)
    pdf[0] = 1.0
    cdf = quantized_cdf(pdf).tolist()
    coder = ArithmeticEncoder()
    coder.push_bounds([0] * 20000, [cdf[0]] * 20000)
    num_bits = 8 * len(coder.finish())
    assert num_bits < 64  # ~3.5 bits of information plus the coder's 24-bit start
    assert max_symbols_for_bits(num_bits, card) >= 20000
    pdfs, cdfs, symbols = coding_case(8, 500, card)
    assert max_symbols_for_bits(8 * len(reference_bytes(pdfs, symbols)), card) >= 500


# -- the LM prior ----------------------------------------------------------------------
def models(num_codebooks: int, past_context: int, seed: int = 0):
    torch.manual_seed(seed)
    ref = LMModel(num_codebooks, 1024, num_layers=5, dim=200, past_context=past_context).eval()
    ours = EntropyLM(num_codebooks=num_codebooks, card=1024, past_context=past_context)
    ours.load_state_dict(ref.state_dict())
    return ref, ours.eval()


def test_state_dict_names_and_shapes_match_the_release():
    ref, ours = models(32, 262)
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in ref.state_dict().items()}
    lm = EntropyLM.for_codec(num_codebooks=16, card=1024, frame_rate=150)
    assert lm.past_context == 525 and lm.dim == 200 and len(lm.transformer.layers) == 5
    assert lm.transformer.layers[0].linear1.out_features == 800


@pytest.mark.parametrize("num_codebooks,used,past_context,steps", [
    (32, 8, 262, 24),   # the 24 kHz LM: window grows past the exactly-recomputed rows
    (16, 16, 12, 40),   # window slides after the cached-rows regime starts
    (4, 2, 3, 12),      # window slides while still recomputed
])
def test_streaming_probabilities_are_bitwise_the_reference(num_codebooks, used, past_context,
                                                           steps):
    ref, ours = models(num_codebooks, past_context)
    codes = torch.randint(0, 1024, (1, used, steps), generator=torch.Generator().manual_seed(1))
    state = ours.initial_state(used)
    ref_states, offset = None, 0
    ref_input = torch.zeros(1, used, 1, dtype=torch.long)
    ref_steps = []
    with torch.no_grad():
        for t in range(steps):
            probas, ref_states, offset = ref(ref_input, ref_states, offset)
            ref_steps.append(probas[0, :, :, 0].T)
            got = ours.step(state, None if t == 0 else codes[:, :, t - 1])
            assert got.shape == (1, used, 1024)
            assert torch.equal(got[0], ref_steps[-1]), f"step {t} differs"
            ref_input = 1 + codes[:, :, t:t + 1]
        # Offline over the whole sequence: the reference's own offline call differs from its
        # streaming one by float rounding, and so does ours.
        ref_offline = ref(torch.cat([torch.zeros_like(codes[..., :1]), 1 + codes[..., :-1]],
                                    dim=-1))[0][0].permute(1, 2, 0)
    offline = ours(codes)[0]
    torch.testing.assert_close(offline, ref_offline, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(offline, torch.stack(ref_steps, dim=1), rtol=1e-4, atol=1e-7)


def test_uncached_keys_match_the_reference_with_several_threads():
    """With 2 threads MKL splits the reference's window products differently, so cached key
    rows can differ; recomputing them as the reference does matches at any thread count."""
    ref, ours = models(32, 262)
    codes = torch.randint(0, 1024, (1, 4, 30), generator=torch.Generator().manual_seed(2))
    torch.set_num_threads(2)
    state = ours.initial_state(4, cache_keys=False)
    ref_states, offset = None, 0
    with torch.no_grad():
        for t in range(30):
            ref_input = torch.zeros(1, 4, 1, dtype=torch.long) if t == 0 else 1 + codes[..., t - 1:t]
            probas, ref_states, offset = ref(ref_input, ref_states, offset)
            got = ours.step(state, None if t == 0 else codes[:, :, t - 1])
            assert torch.equal(got[0], probas[0, :, :, 0].T), f"step {t} differs"


def test_step_rejects_wrong_shapes():
    _, ours = models(4, 10)
    state = ours.initial_state(2)
    with pytest.raises(ValueError, match="shape"):
        ours.step(state, torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="codebooks"):
        ours.initial_state(5)
    with pytest.raises(ValueError, match="past_context"):
        EntropyLM(num_codebooks=1, card=4, past_context=0)
