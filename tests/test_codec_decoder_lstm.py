"""A decoder LSTM added to a trained codec (codec.training.widen.add_decoder_lstm,
EncodecConfig.decoder_lstm) and a discriminator carried over from another run
(``--discriminator-from``): same codes, same audio at the start, gradients into the new LSTM,
stored and streamed like any codec."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_codec_training import clips, corpus_dir, run  # noqa: F401
from test_codec_widen import BASE, _audio, assert_stored_and_streamed

from codec.config import EncodecConfig
from codec.formats import load_model
from codec.training import build_codec
from codec.training.loop import CheckpointManager
from codec.training.trainer import CodecTrainer
from codec.training.widen import add_decoder_lstm, widen_decoder


@pytest.mark.parametrize("layers", [1, 2])
def test_the_lstm_keeps_codes_and_audio_and_learns(layers):
    base = build_codec(BASE, seed=0).eval()
    longer = add_decoder_lstm(base, layers, seed=1).eval()
    assert longer.config.decoder_lstm == layers and longer.config.lstm == 0
    assert longer.config.decoder_lstm_layers == layers and not any(
        "lstm" in name for name, _ in longer.encoder.named_parameters())
    x = _audio()
    with torch.no_grad():
        assert torch.equal(longer.encode_to_codes(x), base.encode_to_codes(x))
        reference = base.decode(base.encode(x))
        assert reference.abs().max() > 1e-3
        assert torch.equal(longer.decode(longer.encode(x)), reference)  # the LSTM starts exactly silent
    lstm = longer.decoder.model[1].lstm
    assert lstm.num_layers == layers and lstm.hidden_size == 16 * BASE.n_filters
    # Training moves it: the silent gate's weights get gradients from the first step.
    longer.train()
    with torch.no_grad():
        latent = longer.quantizer.decode(longer.quantizer.encode(longer.encoder(x)))
    longer.decoder(latent).pow(2).mean().backward()
    hidden, last = lstm.hidden_size, layers - 1
    assert getattr(lstm, f"weight_ih_l{last}").grad[2 * hidden:3 * hidden].abs().sum() > 0
    assert getattr(lstm, f"bias_ih_l{last}").grad[2 * hidden:3 * hidden].abs().sum() > 0


def test_a_codec_with_a_decoder_lstm_saves_loads_and_streams(tmp_path):
    longer = add_decoder_lstm(widen_decoder(build_codec(BASE, seed=0), 8, seed=0), 2, seed=0)
    with torch.no_grad():  # make the LSTM speak, so streaming has state to carry
        for name, weight in longer.decoder.model[1].lstm.named_parameters():
            weight.add_(0.1 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(len(name))))
    loaded = assert_stored_and_streamed(longer.eval(), tmp_path, refusal="own LSTM.*tokenwave", atol=1e-5)
    assert loaded.config.decoder_lstm == 2 and loaded.config.decoder_filters == 8


def test_decoder_lstm_in_the_config():
    assert "decoder_lstm" not in BASE.to_dict()  # every other codec's config is stored as before
    config = replace(BASE, decoder_lstm=2)
    assert config.to_dict()["decoder_lstm"] == 2 and config.decoder_lstm_layers == 2 and BASE.decoder_lstm_layers == 0
    assert EncodecConfig.from_dict(config.to_dict()) == config and config.decoder_differs
    assert not BASE.decoder_differs and replace(BASE, lstm=2).decoder_lstm_layers == 2
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="decoder_lstm must be"):
            replace(BASE, decoder_lstm=bad)
    base = build_codec(BASE, seed=0)
    for bad in (0, -2):
        with pytest.raises(ValueError, match="1 or more"):
            add_decoder_lstm(base, bad)
    with pytest.raises(ValueError, match="already has an LSTM"):
        add_decoder_lstm(add_decoder_lstm(base, 1), 1)
    with pytest.raises(ValueError, match="already has an LSTM"):
        add_decoder_lstm(build_codec(replace(BASE, lstm=1), seed=0), 1)
    with pytest.raises(ValueError, match="LSTM"):  # widening would have to widen the LSTM too
        widen_decoder(add_decoder_lstm(base, 1), 8)


def _options(*, parts: str = "decoder", filters: int = 4, steps: int = 2) -> list:
    return ["--train-parts", parts, "--loss-weights", "timbre_gan", "--disc-filters", filters,
            "--disc-windows", "256,128", "--steps", steps, "--batch-size", "2", "--segment-seconds", "0.2",
            "--valid-clips", "0", "--num-workers", "0", "--checkpoint-every", "2", "--cpu", "-q"]


def test_cli_decoder_lstm_against_a_carried_over_discriminator(tmp_path, capsys, corpus_dir):  # noqa: F811
    base = build_codec(BASE, seed=0)
    base.save_pretrained(tmp_path / "base")
    code, _, err = run(capsys, "train-codec", corpus_dir, "--out", tmp_path / "critic", "--from", tmp_path / "base",
                       "--name", "critic", *_options())
    assert code == 0, err
    critic = CheckpointManager(tmp_path / "critic" / "checkpoints").latest()
    source = CheckpointManager.load(critic, CodecTrainer.kind)

    args = ["train-codec", corpus_dir, "--out", tmp_path / "run", "--from", tmp_path / "base", "--name", "longer",
            "--decoder-lstm", "2"]
    code, _, err = run(capsys, *args, "--discriminator-from", critic, *_options(parts="all"))
    assert code == 1 and "--train-parts decoder" in err and not (tmp_path / "run").exists()
    code, _, err = run(capsys, *args, "--discriminator-from", critic, *_options(filters=8))
    assert code == 1 and "disc_filters" in err and "--disc-filters" in err
    code, _, err = run(capsys, *args, "--discriminator-from", tmp_path / "nowhere", *_options())
    assert code == 1 and "--discriminator-from" in err

    code, _, err = run(capsys, *args, "--discriminator-from", critic, *_options(steps=1))
    assert code == 0, err
    longer = load_model(tmp_path / "run" / "longer")
    assert longer.config.decoder_lstm == 2
    wav = clips(corpus_dir)[0][None]
    with torch.no_grad():
        assert torch.equal(longer.encode_to_codes(wav), base.eval().encode_to_codes(wav))
    resume = ["train-codec", corpus_dir, "--out", tmp_path / "run", "--resume", "--steps", "2", "--cpu", "-q"]
    code, _, err = run(capsys, *resume, "--discriminator-from", critic)
    assert code == 1 and "--discriminator-from" in err
    code, _, err = run(capsys, *resume)
    assert code == 0, err
    state = CheckpointManager.load(CheckpointManager(tmp_path / "run" / "checkpoints").latest(), CodecTrainer.kind)
    assert state["step"] == 2 and EncodecConfig.from_dict(state["codec_config"]).decoder_lstm == 2
    assert set(state["discriminator"]) == set(source["discriminator"])


def test_load_discriminator_takes_the_critic_and_refuses_a_mismatch(tmp_path, capsys, corpus_dir):  # noqa: F811
    from test_codec_training import FAST

    config = replace(FAST, loss_weights="timbre_gan", train_parts="decoder")
    first = CodecTrainer(build_codec(BASE, seed=0), tmp_path / "a", config)
    with torch.no_grad():
        for weight in first.plain_discriminator.parameters():
            weight.add_(1.0)
    state = first.state_dict()
    second = CodecTrainer(add_decoder_lstm(build_codec(BASE, seed=0), 1), tmp_path / "b", config)
    second.load_discriminator(state)
    for mine, theirs in zip(second.plain_discriminator.state_dict().values(), state["discriminator"].values()):
        assert torch.equal(mine, theirs)
    with pytest.raises(ValueError, match="disc_windows"):
        CodecTrainer(build_codec(BASE, seed=0), tmp_path / "c",
                     replace(config, disc_windows=(256, 128))).load_discriminator(state)
    with pytest.raises(ValueError, match="without a discriminator"):
        CodecTrainer(build_codec(BASE, seed=0), tmp_path / "d",
                     replace(config, loss_weights="spectral")).load_discriminator(state)
