"""transformers' EncodecModel is the oracle: same random weights, same codes, same audio.

The hub configs (facebook/encodec_24khz, _48khz, _32khz) are rebuilt offline from
``transformers.EncodecConfig`` with the settings transformers' conversion script applies. Each
model gets random weights (codebooks re-randomized so codes are non-trivial), is written with
``save_pretrained`` (safetensors; a narrow 24 kHz twin also as a transformers-4.x style
``pytorch_model.bin`` with ``weight_g``/``weight_v`` names) and read back by
``codec.formats.load_model``. Narrow twins (same config, fewer filters) run every length
(1, 319, 321 and ~1.5 s + 7 samples) at every bandwidth; the full-size models run the short
lengths at the largest bandwidth and every bandwidth at 321 samples, which keeps the file
fast. ``TOKENWAVE_FULL_ORACLES=1`` runs the full-size models through everything.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from codec import PRESETS  # noqa: E402
from codec.formats import load_model, read_checkpoint, save_model  # noqa: E402

# config.json of the hub repositories = transformers' EncodecConfig defaults + these settings.
HUB_CONFIGS = {
    "encodec_24khz": {},
    "encodec_48khz": dict(target_bandwidths=[3.0, 6.0, 12.0, 24.0], sampling_rate=48_000,
                          audio_channels=2, use_causal_conv=False, norm_type="time_group_norm",
                          normalize=True, chunk_length_s=1.0, overlap=0.01),
    "encodec_32khz": dict(target_bandwidths=[2.2], sampling_rate=32_000,
                          upsampling_ratios=[8, 5, 4, 4], num_filters=64, codebook_size=2048,
                          use_causal_conv=False, normalize=False, use_conv_shortcut=False),
}
NARROW = dict(num_filters=4, hidden_size=16)
SHORT_LENGTHS = (1, 319, 321)
FULL = os.environ.get("TOKENWAVE_FULL_ORACLES") == "1"


def long_length(sample_rate: int) -> int:
    return sample_rate * 3 // 2 + 7


def random_hf_model(settings: dict, seed: int) -> "transformers.EncodecModel":
    """Random weights; codebooks are random frames of the residual they quantize, plus noise.

    Plain N(0, 1) codebooks sit so far from the encoder's output that a handful of codes win
    every frame, which would make code equality prove little.
    """
    torch.manual_seed(seed)
    model = transformers.EncodecModel(transformers.EncodecConfig(**settings)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".norm." in name:  # GroupNorm starts at 1 / 0: make the 48 kHz affine non-trivial
                param.uniform_(0.5, 1.5) if name.endswith("weight") else param.normal_(0, 0.1)
        sample = torch.randn(4, model.config.audio_channels, model.config.sampling_rate // 2)
        residual = model.encoder(sample)  # (B, D, F)
        for layer in model.quantizer.layers:
            codebook, frames = layer.codebook, residual.transpose(1, 2).flatten(0, 1)
            picks = torch.randint(0, frames.shape[0], (codebook.embed.shape[0],))
            codebook.embed.copy_(frames[picks] + frames.std(0) * torch.randn_like(
                codebook.embed))
            codebook.embed_avg.copy_(codebook.embed)
            codebook.cluster_size.uniform_(0, 10)
            codebook.inited.fill_(1.0)
            residual = residual - layer.decode(layer.encode(residual))
    return model


@pytest.fixture(scope="module", params=[(n, w) for n in HUB_CONFIGS for w in ("full", "narrow")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its save_pretrained folder, folder)."""
    name, width = request.param
    settings = {**HUB_CONFIGS[name], **(NARROW if width == "narrow" else {})}
    hf = random_hf_model(settings, seed=len(name) + len(width))
    folder = tmp_path_factory.mktemp("hf") / name
    hf.save_pretrained(folder)
    return name, width, hf, load_model(folder), folder


def compare(hf, ours, wav: torch.Tensor, bandwidth: float) -> None:
    """Codes identical, scales equal, decoded audio within 1e-5 (max abs)."""
    with torch.no_grad():
        expected = hf.encode(wav, bandwidth=bandwidth)
        frames = ours.encode(wav, bandwidth=bandwidth)
        assert expected.audio_codes.shape[0] == len(frames)
        for i, frame in enumerate(frames):
            codes = expected.audio_codes[i]
            assert codes.shape[:2] == frame.codes.shape[:2]
            assert torch.equal(codes[..., : frame.codes.shape[-1]], frame.codes)
            if (expected.audio_scales[i] is None) != (frame.scale is None):
                raise AssertionError(f"chunk {i}: scale presence differs")
            if frame.scale is not None:
                torch.testing.assert_close(frame.scale, expected.audio_scales[i], rtol=0, atol=0)
        audio = hf.decode(expected.audio_codes, expected.audio_scales,
                          last_frame_pad_length=expected.last_frame_pad_length).audio_values
        decoded = ours.decode(frames)
    assert decoded.shape == audio.shape
    assert (decoded - audio).abs().max().item() <= 1e-5


def test_config_json_gives_our_config(pair):
    name, width, hf, ours, folder = pair
    expected = PRESETS[name]
    if width == "narrow":
        expected = replace(expected, n_filters=NARROW["num_filters"],
                           dimension=NARROW["hidden_size"])
    if name == "encodec_32khz":  # transformers' 32 kHz config keeps the reflect default
        expected = replace(expected, pad_mode="reflect")
    if width == "narrow" or name == "encodec_32khz":
        expected = replace(expected, name=folder.name)
    assert ours.config == expected
    assert json.loads((folder / "config.json").read_text())["pad_mode"] == expected.pad_mode


@pytest.mark.parametrize("length", SHORT_LENGTHS)
def test_short_inputs(pair, length):
    _, width, hf, ours, _ = pair
    torch.manual_seed(length)
    wav = torch.randn(2, ours.channels, length)
    bandwidths = hf.config.target_bandwidths
    if width == "full" and not FULL and length != 321:
        bandwidths = bandwidths[-1:]  # every bandwidth runs at 321 samples
    for bandwidth in bandwidths:
        compare(hf, ours, wav, bandwidth)


def test_long_input_every_bandwidth(pair):
    _, width, hf, ours, _ = pair
    if width == "full" and not FULL:
        pytest.skip("full-size long input: set TOKENWAVE_FULL_ORACLES=1 (narrow twin runs it)")
    torch.manual_seed(1)
    wav = torch.randn(2, ours.channels, long_length(ours.sample_rate))
    with torch.no_grad():
        codes = ours.encode(wav)[0].codes
    for k in range(codes.shape[1]):  # every codebook uses many codes
        assert codes[:, k].unique().numel() > 8
    for bandwidth in hf.config.target_bandwidths:
        compare(hf, ours, wav, bandwidth)


def test_a_missing_bandwidth_means_the_smallest_in_transformers_and_all_here(pair):
    _, _, hf, ours, _ = pair
    wav = torch.randn(1, ours.channels, 321)
    with torch.no_grad():
        hf_codebooks = hf.encode(wav).audio_codes.shape[2]
        ours_codebooks = ours.encode(wav)[0].codes.shape[1]
    assert hf_codebooks == ours.num_codebooks_for_bandwidth(hf.config.target_bandwidths[0])
    assert ours_codebooks == ours.num_codebooks


def legacy_names(state: dict) -> dict:
    """transformers 4.x checkpoints name weight norm ``weight_g``/``weight_v``."""
    return {k.replace("parametrizations.weight.original0", "weight_g")
             .replace("parametrizations.weight.original1", "weight_v"): v
            for k, v in state.items()}


def test_pytorch_model_bin_with_legacy_names(pair, tmp_path):
    name, width, hf, ours, folder = pair
    if (name, width) != ("encodec_24khz", "narrow"):
        pytest.skip("key names do not depend on widths: one narrow model shows the .bin layout")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    torch.save(legacy_names(hf.state_dict()), tmp_path / "pytorch_model.bin")
    # transformers itself reads this layout back to the same weights ...
    reloaded, info = transformers.EncodecModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    for key, value in hf.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    # ... and so do we.
    from_bin = read_checkpoint(tmp_path)
    from_safetensors = read_checkpoint(folder)
    assert from_bin.config == replace(from_safetensors.config, name=tmp_path.name)
    assert from_bin.state.keys() == from_safetensors.state.keys()
    for key, value in from_safetensors.state.items():
        assert torch.equal(from_bin.state[key], value), key


def test_our_transformers_writer_is_read_by_transformers(pair, tmp_path):
    name, width, hf, _, folder = pair
    if width != "narrow":
        pytest.skip("the writer is checked on the narrow twins")
    trainable = load_model(folder, inference=False)  # weight_g / weight_v kept exactly
    written = save_model(trainable, tmp_path / name, format="transformers")
    reloaded, info = transformers.EncodecModel.from_pretrained(written, output_loading_info=True)
    assert not any(info.values()), info
    assert reloaded.config.pad_mode == hf.config.pad_mode
    assert reloaded.config.use_conv_shortcut == hf.config.use_conv_shortcut
    for key, value in hf.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
