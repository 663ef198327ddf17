"""A widened decoder (codec.training.widen, EncodecConfig.decoder_filters): same codes, same audio
at the start, extra width that training can use, stored and streamed like any codec."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_codec_training import TINY, clips, corpus_dir, run  # noqa: F401

from codec.config import EncodecConfig
from codec.formats import load_model, save_model
from codec.streaming import StreamingDecoder
from codec.training import build_codec
from codec.model import EncodecModel
from codec.training.widen import widen_decoder

BASE = replace(TINY, name="base", causal=False, true_skip=True)


def _audio(seconds: float = 0.3, seed: int = 0) -> torch.Tensor:
    return 0.1 * torch.randn(1, 1, round(seconds * BASE.sample_rate), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("true_skip", [True, False])
def test_widening_keeps_codes_and_audio_and_adds_width(true_skip):
    base = build_codec(replace(BASE, true_skip=true_skip), seed=0).eval()
    wide = widen_decoder(base, 12, seed=1).eval()
    assert wide.config.decoder_filters == 12 and wide.config.n_filters == base.config.n_filters
    assert sum(p.numel() for p in wide.decoder.parameters()) > 4 * sum(p.numel() for p in base.decoder.parameters())
    x = _audio()
    with torch.no_grad():
        codes = base.encode_to_codes(x)
        assert torch.equal(wide.encode_to_codes(x), codes)
        reference = base.decode(base.encode(x))
        assert reference.abs().max() > 1e-3
        torch.testing.assert_close(wide.decode(wide.encode(x)), reference, atol=1e-6, rtol=1e-5)
    # The base is untouched and the new channels are random, not copies (copies would never diverge).
    first = wide.decoder.model[0].conv.conv.weight_v
    assert first.shape[0] == 16 * 12 and not torch.allclose(first[16 * 4: 16 * 5], first[16 * 8: 16 * 9])


def test_the_new_width_gets_gradients_into_the_old_channels():
    """The zero weights from new channels into old ones are what training grows: they get gradients."""
    wide = widen_decoder(build_codec(BASE, seed=0), 8, seed=0).train()
    x = _audio()
    with torch.no_grad():
        latent = wide.quantizer.decode(wide.quantizer.encode(wide.encoder(x)))
    wide.decoder(latent).pow(2).mean().backward()
    last = wide.decoder.model[-1].conv.conv  # old output channels <- 8 inputs, 4 of them new
    assert last.weight_v[:, :4].abs().sum() > 0 and last.weight_v[:, 4:].abs().sum() == 0
    assert last.weight_v.grad[:, 4:].abs().sum() > 0


def assert_stored_and_streamed(model, folder, *, refusal: str, atol: float) -> EncodecModel:
    """``model`` saved and loaded decodes as before (``atol``), streams in pieces as it decodes at once
    (10x ``atol``), and the foreign formats refuse it (message matching ``refusal``) writing nothing."""
    x = _audio(0.5)
    with torch.no_grad():
        frames = model.encode(x)
        full = model.decode(frames)
    save_model(model, folder / "model")
    loaded = load_model(folder / "model")
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(frames), full, atol=atol, rtol=10 * atol)
        stream, codes = StreamingDecoder(loaded), frames[0].codes
        parts = [stream.push(codes[..., i:i + 3]) for i in range(0, codes.shape[-1], 3)]
        parts.append(stream.flush())
    torch.testing.assert_close(torch.cat(parts, -1), full, atol=10 * atol, rtol=100 * atol)
    for fmt in ("transformers", "original", "audiocraft"):
        with pytest.raises(ValueError, match=refusal):
            save_model(model, folder / fmt, format=fmt)
        assert not (folder / fmt).exists()
    return loaded


def test_a_widened_codec_saves_loads_and_streams(tmp_path):
    wide = widen_decoder(build_codec(BASE, seed=0), 8, seed=0).eval()
    loaded = assert_stored_and_streamed(wide, tmp_path, refusal="widened .*tokenwave", atol=1e-6)
    assert loaded.config.decoder_filters == 8


def test_decoder_filters_in_the_config():
    assert "decoder_filters" not in BASE.to_dict()  # every other codec's config is stored as before
    config = replace(BASE, decoder_filters=8)
    assert config.to_dict()["decoder_filters"] == 8 and config.decoder_width == 8 and BASE.decoder_width == 4
    assert EncodecConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="multiple of compress"):
        replace(BASE, decoder_filters=7)
    base = build_codec(BASE, seed=0)
    with pytest.raises(ValueError, match="already has 4 filters"):
        widen_decoder(base, 4)
    with pytest.raises(ValueError, match="lstm=1"):
        widen_decoder(build_codec(replace(BASE, lstm=1), seed=0), 8)


def test_cli_widen_decoder_fine_tunes_a_wider_decoder_on_the_same_codes(tmp_path, capsys, corpus_dir):  # noqa: F811
    base = build_codec(BASE, seed=0)
    base.save_pretrained(tmp_path / "base")
    args = ["train-codec", corpus_dir, "--out", tmp_path / "run", "--from", tmp_path / "base", "--name", "wide",
            "--loss-weights", "spectral", "--steps", "2", "--batch-size", "2", "--segment-seconds", "0.2",
            "--valid-clips", "0", "--num-workers", "0", "--cpu", "-q", "--widen-decoder", "8"]
    code, _, err = run(capsys, *args)  # without --train-parts decoder the codes would move
    assert code == 1 and "--train-parts decoder" in err and not (tmp_path / "run").exists()
    code, _, err = run(capsys, *args, "--train-parts", "decoder")
    assert code == 0, err
    wide = load_model(tmp_path / "run" / "wide")
    assert wide.config.decoder_filters == 8
    wav = clips(corpus_dir)[0][None]
    with torch.no_grad():
        assert torch.equal(wide.encode_to_codes(wav), base.eval().encode_to_codes(wav))
    code, _, err = run(capsys, "train-codec", corpus_dir, "--out", tmp_path / "run", "--resume", "--steps", "3",
                       "--widen-decoder", "12", "--cpu", "-q")
    assert code == 1 and "--widen-decoder" in err
    code, _, err = run(capsys, "train-codec", corpus_dir, "--out", tmp_path / "run", "--resume", "--steps", "3",
                       "--cpu", "-q")
    assert code == 0, err
    assert load_model(tmp_path / "run" / "wide").config.decoder_filters == 8
