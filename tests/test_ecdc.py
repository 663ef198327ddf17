""".ecdc files against the original `encodec` package, with shared random weights.

Same audio, same weights (codec and entropy LM) -> the same bytes; and each implementation
decodes the other's files to the same audio.
"""
from __future__ import annotations

import importlib
import io
import json
import struct
from functools import lru_cache

import pytest
import torch

from codec import EncodecModel, EncodedFrame, ecdc
from codec.ecdc import CodecLayout, EcdcError, EcdcHeader
from codec.entropy_lm import EntropyLM
from codec.model import PRESETS
from oracles import import_encodec

encodec = import_encodec()
from encodec.binary import BitPacker  # noqa: E402
from encodec.model import LMModel  # noqa: E402

reference = importlib.import_module("encodec.compress")
REF_CONSTRUCTORS = {"encodec_24khz": encodec.EncodecModel.encodec_model_24khz,
                    "encodec_48khz": encodec.EncodecModel.encodec_model_48khz}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@lru_cache(maxsize=None)
def pair(name: str):
    """(reference model, reference LM, our model, our LM) with the same random weights."""
    torch.manual_seed(0)
    ref = REF_CONSTRUCTORS[name](pretrained=False)
    ref.name = name  # compress writes it; pretrained=False leaves 'unset'
    ref_lm = LMModel(ref.quantizer.n_q, ref.quantizer.bins, num_layers=5, dim=200,
                     past_context=int(3.5 * ref.frame_rate)).eval()
    ref.get_lm_model = lambda: ref_lm  # instead of downloading the released LM
    ours = EncodecModel.from_preset(name)
    ours.load_state_dict(ref.state_dict())
    ours.eval()
    lm = EntropyLM.for_codec(num_codebooks=ours.num_codebooks, card=ours.codebook_size,
                             frame_rate=ours.frame_rate)
    lm.load_state_dict(ref_lm.state_dict())
    return ref, ref_lm, ours, lm.eval()


@pytest.fixture
def reference_models(monkeypatch):
    """Make the reference decoder use our shared-weight reference models instead of
    building (and downloading) pretrained ones."""
    for name in REF_CONSTRUCTORS:
        monkeypatch.setitem(reference.MODELS, name, lambda name=name: pair(name)[0])


def audio(channels: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(length) / 24000
    tone = 0.2 * torch.sin(2 * torch.pi * 330 * t)
    return (tone + 0.05 * torch.randn(channels, length, generator=gen)).float()


CASES = [
    # name, samples, kbps, use_lm
    ("encodec_24khz", 12_017, 6.0, False),
    ("encodec_24khz", 12_017, 6.0, True),
    ("encodec_24khz", 997, 1.5, True),        # 4 frames, 2 codebooks: 2.5 bytes unpacked
    ("encodec_24khz", 30_001, 24.0, False),   # all 32 codebooks
    ("encodec_48khz", 51_523, 6.0, False),    # two chunks, the second 4003 samples
    ("encodec_48khz", 51_523, 3.0, True),
    ("encodec_48khz", 7_001, 12.0, False),
]


@pytest.mark.parametrize("name,length,bandwidth,use_lm", CASES)
def test_bytes_and_audio_match_reference(name, length, bandwidth, use_lm, reference_models):
    ref, _, ours, lm = pair(name)
    wav = audio(ours.channels, length, seed=length)
    ref.set_target_bandwidth(bandwidth)
    with torch.no_grad():
        ref_bytes = reference.compress(ref, wav, use_lm=use_lm)
    our_bytes = ecdc.compress(wav, ours.sample_rate, ours, bandwidth=bandwidth, use_lm=use_lm,
                              lm=lm)
    assert our_bytes == ref_bytes

    header, _ = ecdc.read_header(our_bytes)
    assert header == EcdcHeader(name, length, ours.num_codebooks_for_bandwidth(bandwidth), use_lm)

    # Each decodes the other's file (the bytes are equal, so this checks both decoders).
    ours_decoded, sample_rate = ecdc.decompress(ref_bytes, ours, lm=lm)
    with torch.no_grad():
        ref_decoded, ref_rate = reference.decompress(our_bytes)
    assert sample_rate == ref_rate == ours.sample_rate
    assert ours_decoded.shape == ref_decoded.shape == wav.shape
    torch.testing.assert_close(ours_decoded, ref_decoded, rtol=0, atol=1e-5)


def test_entropy_coding_is_smaller_with_a_fitted_prior():
    """With an LM that has learned the codes' statistics the LM file beats 10 bits a code."""
    _, _, ours, _ = pair("encodec_24khz")
    lm = EntropyLM.for_codec(num_codebooks=32, card=1024, frame_rate=75).eval()
    with torch.no_grad():  # a prior that puts most mass on code 0 of every codebook
        for head in lm.linears:
            head.weight.zero_()
            head.bias.zero_()
            head.bias[0] = 8.0
    layout = CodecLayout.from_model(ours)
    codes = torch.zeros(1, 4, 50, dtype=torch.long)
    codes[0, :, ::10] = torch.arange(4).view(-1, 1) + 5
    packed, coded = io.BytesIO(), io.BytesIO()
    ecdc.write_body(packed, [EncodedFrame(codes, None)], layout)
    ecdc.write_body(coded, [EncodedFrame(codes, None)], layout, lm)
    assert len(coded.getvalue()) < len(packed.getvalue()) / 3
    header = EcdcHeader(ours.name, 50 * 320, 4, True).to_bytes()
    _, frames = ecdc.parse_ecdc(header + coded.getvalue(), layout, lm)
    assert torch.equal(frames[0].codes, codes)


def test_lengths_where_the_reference_miscounts_frames(reference_models):
    """6720 samples at 24 kHz are exactly 21 frames; the original decoder computes
    ceil(6720 / 24000 * 75) = ceil(21.000000000000004) = 22 and runs out of data."""
    ref, _, ours, _ = pair("encodec_24khz")
    wav = audio(1, 6720, seed=3)
    data = ecdc.compress(wav, 24000, ours, bandwidth=6.0)
    decoded, _ = ecdc.decompress(data, ours)
    with torch.no_grad():
        expected = ours.decode(ours.encode(wav[None], bandwidth=6.0))[0, :, :6720]
    torch.testing.assert_close(decoded, expected, rtol=0, atol=1e-6)
    with pytest.raises(EOFError):
        reference.decompress(data)


@pytest.mark.parametrize("name", ["encodec_32khz", "encodec_16khz"])
def test_2048_entry_codebooks_use_11_bits(name):
    config = PRESETS[name]
    layout = CodecLayout(name=name, sample_rate=config.sample_rate, channels=1,
                         frame_rate=config.frame_rate, num_codebooks=4, codebook_size=2048,
                         normalize=False, segment_length=None, segment_stride=None)
    assert layout.bits_per_codebook == 11
    codes = torch.randint(0, 2048, (1, 3, 17), generator=torch.Generator().manual_seed(0))
    body = io.BytesIO()
    ecdc.write_body(body, [EncodedFrame(codes, None)], layout)
    expected = io.BytesIO()  # the original's packer with log2(bins) bits, frame-major
    packer = BitPacker(11, expected)
    for value in codes[0].t().reshape(-1).tolist():
        packer.push(value)
    packer.flush()
    assert body.getvalue() == expected.getvalue()
    samples = 17 * config.hop_length - 5
    data = EcdcHeader(name, samples, 3, False).to_bytes() + body.getvalue()
    header, frames = ecdc.parse_ecdc(data, layout)
    assert header.audio_length == samples and torch.equal(frames[0].codes, codes)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_layout_from_config_matches_the_model(name):
    from dataclasses import replace

    model = EncodecModel(replace(PRESETS[name], n_filters=2, dimension=8, lstm=0))
    assert CodecLayout.from_config(model.config) == CodecLayout.from_model(model)


def test_file_objects_and_bytes_agree():
    _, _, ours, lm = pair("encodec_24khz")
    wav = audio(1, 5000, seed=1)
    buffer = io.BytesIO()
    ecdc.write_ecdc(buffer, wav, 24000, ours, num_codebooks=3, use_lm=True, lm=lm)
    assert buffer.getvalue() == ecdc.compress(wav, 24000, ours, num_codebooks=3, use_lm=True,
                                              lm=lm)
    buffer.seek(0)
    from_file, rate = ecdc.read_ecdc(buffer, ours, lm=lm)
    from_bytes, _ = ecdc.decompress(buffer.getvalue(), ours, lm=lm)
    assert rate == 24000 and torch.equal(from_file, from_bytes)


def test_models_and_lms_are_found_by_name(tmp_path):
    from codec.formats import save_model

    _, _, ours, lm = pair("encodec_24khz")
    wav = audio(1, 4000, seed=2)
    data = ecdc.compress(wav, 24000, ours, bandwidth=3.0, use_lm=True, lm=lm)

    with pytest.raises(EcdcError, match="encodec_24khz"):
        ecdc.decompress(data, models_dir=tmp_path)  # no model there
    save_model(ours, tmp_path / "encodec_24khz")
    with pytest.raises(EcdcError, match="encodec_lm_24khz"):
        ecdc.decompress(data, models_dir=tmp_path)  # model found, LM not
    torch.save(lm.state_dict(), tmp_path / "encodec_lm_24khz.th")
    decoded, _ = ecdc.decompress(data, models_dir=tmp_path)
    expected, _ = ecdc.decompress(data, ours, lm=lm)
    loaded = ecdc.load_entropy_lm("encodec_24khz", models_dir=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                 lm.state_dict().values()))
    torch.testing.assert_close(decoded, expected, rtol=0, atol=1e-5)
    assert ecdc.compress(wav, 24000, ours, bandwidth=3.0, use_lm=True, models_dir=tmp_path) == data

    # A file with the release name must have the release checksum.
    (tmp_path / "encodec_lm_24khz.th").rename(tmp_path / "encodec_lm_24khz-1608e3c0.th")
    with pytest.raises(EcdcError, match="sha256"):
        ecdc.decompress(data, models_dir=tmp_path)


def replace_metadata(data: bytes, **changes) -> bytes:
    header, offset = ecdc.read_header(data)
    meta = {"m": header.model_name, "al": header.audio_length, "nc": header.num_codebooks,
            "lm": header.use_lm, **changes}
    raw = json.dumps(meta).encode()
    return struct.pack("!4sBI", b"ECDC", 0, len(raw)) + raw + data[offset:]


def test_files_naming_other_or_unknown_models_are_refused(tmp_path):
    _, _, ours, _ = pair("encodec_24khz")
    _, _, ours_48, _ = pair("encodec_48khz")
    data = ecdc.compress(audio(1, 3000, seed=4), 24000, ours, bandwidth=6.0)
    with pytest.raises(EcdcError, match="encodec_48khz"):
        ecdc.decompress(data, ours_48)
    for name in ("encodec_99khz", "../encodec_24khz", "/etc/passwd", ""):
        with pytest.raises(EcdcError):
            ecdc.decompress(replace_metadata(data, m=name), models_dir=tmp_path)
    with pytest.raises(EcdcError, match="codebooks"):
        ecdc.decompress(replace_metadata(data, nc=33), ours)


def test_bad_arguments_raise_clear_errors(tmp_path):
    _, _, ours, _ = pair("encodec_24khz")
    wav = audio(1, 1000, seed=5)
    with pytest.raises(ValueError, match="24000 Hz"):
        ecdc.compress(wav, 16000, ours)
    with pytest.raises(ValueError, match=r"\(channels, samples\)"):
        ecdc.compress(wav[0], 24000, ours)
    with pytest.raises(FileNotFoundError, match="encodec_lm_24khz"):
        ecdc.compress(wav, 24000, ours, use_lm=True, models_dir=tmp_path)
    with pytest.raises(ValueError, match="either"):
        ecdc.compress(wav, 24000, ours, bandwidth=6.0, num_codebooks=8)
