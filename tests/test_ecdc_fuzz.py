"""Malformed .ecdc files: every one ends in `EcdcError` or in valid audio, quickly.

Valid files are built from random codes (no codec needed), then truncated, bit-flipped,
extended, or given a broken header. A tiny entropy LM and tiny codecs keep this fast; the
longer run is `bench/fuzz_ecdc.py`.
"""
from __future__ import annotations

import io
import json
import struct
from dataclasses import replace
from functools import lru_cache

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codec import EncodecModel, EncodedFrame, ecdc
from codec.ecdc import CodecLayout, EcdcError, EcdcHeader
from codec.entropy_lm import EntropyLM
from codec.model import PRESETS

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@lru_cache(maxsize=None)
def tiny_codec(name: str) -> EncodecModel:
    """A codec with the preset's name, rates and chunking but a few hundred weights."""
    torch.manual_seed(0)
    config = replace(PRESETS[name], n_filters=2, dimension=8, lstm=0)
    return EncodecModel(config).eval()


@lru_cache(maxsize=None)
def tiny_lm(num_codebooks: int) -> EntropyLM:
    torch.manual_seed(1)
    return EntropyLM(num_codebooks=num_codebooks, card=1024, past_context=20, dim=16,
                     num_layers=1, num_heads=2, ffn_dim=32).eval()


def layout(name: str) -> CodecLayout:
    return CodecLayout.from_model(tiny_codec(name))


@st.composite
def valid_files(draw):
    """(model name, bytes) of a well-formed file with random codes."""
    name = draw(st.sampled_from(["encodec_24khz", "encodec_48khz"]))
    lay = layout(name)
    length = draw(st.integers(1, int(1.2 * lay.sample_rate)))
    num_codebooks = draw(st.integers(1, 4))
    use_lm = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 16))
    gen = torch.Generator().manual_seed(seed)
    frames = []
    for num_frames in lay.chunk_frames(length):
        codes = torch.randint(0, 1024, (1, num_codebooks, num_frames), generator=gen)
        scale = torch.rand(1, 1, generator=gen) + 0.01 if lay.normalize else None
        frames.append(EncodedFrame(codes, scale))
    body = io.BytesIO()
    ecdc.write_body(body, frames, lay, tiny_lm(lay.num_codebooks) if use_lm else None)
    header = EcdcHeader(name, length, num_codebooks, use_lm).to_bytes()
    return name, header + body.getvalue(), frames


def decode_or_error(name: str, data: bytes) -> None:
    """The property: parse + decode gives audio of the declared shape, or EcdcError."""
    model = tiny_codec(name)
    try:
        header, frames = ecdc.parse_ecdc(data, layout(name), tiny_lm(model.num_codebooks))
    except EcdcError:
        return
    for (codes, scale), num_frames in zip(frames, layout(name).chunk_frames(header.audio_length)):
        assert codes.shape == (1, header.num_codebooks, num_frames)
        assert 0 <= codes.min() and codes.max() < 1024
        assert scale is None or (torch.isfinite(scale).all() and (scale > 0).all())
    wav, rate = ecdc.decompress(data, model, lm=tiny_lm(model.num_codebooks))
    assert wav.shape == (model.channels, header.audio_length) and rate == model.sample_rate


@FUZZ
@given(valid_files())
def test_valid_files_round_trip(case):
    name, data, frames = case
    _, parsed = ecdc.parse_ecdc(data, layout(name), tiny_lm(layout(name).num_codebooks))
    assert len(parsed) == len(frames)
    for (codes, scale), (expected, expected_scale) in zip(parsed, frames):
        assert torch.equal(codes, expected)
        assert (scale is None) == (expected_scale is None)
        if scale is not None:  # stored as float32
            assert torch.equal(scale, expected_scale.float())


@FUZZ
@given(valid_files(), st.data())
def test_truncated_files(case, data):
    name, raw, _ = case
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(EcdcError):
        ecdc.parse_ecdc(raw[:cut], layout(name), tiny_lm(layout(name).num_codebooks))


@FUZZ
@given(valid_files(), st.lists(st.integers(0, 2 ** 20), min_size=1, max_size=8))
def test_bit_flips_anywhere(case, positions):
    name, raw, _ = case
    flipped = bytearray(raw)
    for position in positions:
        bit = position % (8 * len(raw))
        flipped[bit // 8] ^= 1 << (bit % 8)
    decode_or_error(name, bytes(flipped))


@FUZZ
@given(valid_files(), st.binary(min_size=1, max_size=64))
def test_trailing_bytes(case, extra):
    name, raw, _ = case
    with pytest.raises(EcdcError):
        ecdc.parse_ecdc(raw + extra, layout(name), tiny_lm(layout(name).num_codebooks))


@FUZZ
@given(st.binary(max_size=4), st.integers(0, 255), st.integers(0, 2 ** 32 - 1),
       st.binary(max_size=200))
def test_random_headers(magic, version, meta_length, rest):
    data = struct.pack("!4sBI", magic.ljust(4, b"\0"), version, meta_length) + rest
    decode_or_error("encodec_24khz", data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=20)
absurd_ints = st.one_of(st.integers(-10, 10), st.integers(2 ** 20, 2 ** 64),
                        st.just(10 ** 400), st.just(-(2 ** 63)))


@FUZZ
@given(valid_files(), st.fixed_dictionaries(
    {}, optional={"m": st.sampled_from(["encodec_24khz", "encodec_48khz"]) | st.text(max_size=30),
                  "al": absurd_ints | json_values, "nc": absurd_ints | json_values,
                  "lm": st.booleans() | json_values}))
def test_broken_metadata(case, changes):
    name, raw, _ = case
    header, offset = ecdc.read_header(raw)
    meta = {"m": header.model_name, "al": header.audio_length, "nc": header.num_codebooks,
            "lm": header.use_lm, **changes}
    encoded = json.dumps(meta).encode()
    decode_or_error(name, struct.pack("!4sBI", b"ECDC", 0, len(encoded)) + encoded + raw[offset:])


@FUZZ
@given(json_values | st.binary(max_size=100).map(lambda b: b.decode("latin-1")), st.binary(max_size=50))
def test_garbage_metadata(meta, body):
    raw = (json.dumps(meta) if not isinstance(meta, str) else meta).encode("utf-8", "surrogatepass")
    decode_or_error("encodec_48khz", struct.pack("!4sBI", b"ECDC", 0, len(raw)) + raw + body)


def test_specific_malformed_files_name_the_problem():
    lay = layout("encodec_24khz")
    good = EcdcHeader("encodec_24khz", 640, 2, False).to_bytes() + bytes(5)
    assert ecdc.parse_ecdc(good, lay)[1][0].codes.shape == (1, 2, 2)
    cases = {
        b"RIFF" + good[4:]: "magic",
        good[:4] + b"\x01" + good[5:]: "version",
        good[:5] + struct.pack("!I", 2 ** 32 - 1) + good[9:]: "metadata length",
        good[:12]: "truncated in the metadata",
        good[:-1]: "truncated",
        good + b"\0": "unexpected bytes",
        EcdcHeader("encodec_24khz", 10 ** 12, 2, False).to_bytes() + bytes(5): "max_duration",
        EcdcHeader("encodec_24khz", 0, 2, False).to_bytes(): "positive integer",
        EcdcHeader("encodec_24khz", 640, 2, True).to_bytes() + bytes(5): "entropy coded",
    }
    for data, message in cases.items():
        with pytest.raises(EcdcError, match=message):
            ecdc.parse_ecdc(data, lay)
    lm = tiny_lm(32)
    with pytest.raises(EcdcError, match="more than"):  # 2 bytes of bits cannot hold 1e9 codes
        ecdc.parse_ecdc(EcdcHeader("encodec_24khz", 10 ** 9, 32, True).to_bytes() + bytes(3),
                        lay, lm, max_duration=None)
    scale_layout = layout("encodec_48khz")
    nan_scale = EcdcHeader("encodec_48khz", 100, 1, False).to_bytes() + \
        struct.pack("!f", float("nan")) + bytes(2)
    with pytest.raises(EcdcError, match="scale"):
        ecdc.parse_ecdc(nan_scale, scale_layout)
