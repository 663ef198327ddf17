"""A model's own guidance coefficient (its LM config's ``cfg_coef``) is the default of every way to
generate with it: ``MusicGen.generate``, ``inference.generate``, the CLI and the demo's slider;
an explicit ``cfg_coef`` still wins. MusicGen's and audiocraft's checkpoints keep 3."""
from __future__ import annotations

import json

import pytest
import torch
from test_generator import build_tiny_generator

from codec import audio
from inference import MusicGen, cli
from inference import generate as api_generate
from lm.sampling import SamplingConfig


@pytest.fixture(scope="module")
def guided_folder(tmp_path_factory):
    """A tiny generator saved with guidance 6 in its config."""
    folder = tmp_path_factory.mktemp("models") / "guided"
    build_tiny_generator(seed=3).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["lm"]["cfg_coef"] == 3.0  # what a model gets unless its recipe says otherwise
    config["lm"]["cfg_coef"] = 6.0
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_generate_defaults_to_the_models_guidance(guided_folder):
    generator = MusicGen.from_pretrained(guided_folder)
    assert generator.default_sampling == SamplingConfig(cfg_coef=6.0)
    assert build_tiny_generator(seed=3).default_sampling == SamplingConfig()
    prompt, seconds = ["calm piano"], 0.1
    default = generator.generate(prompt, seconds, seed=1).wav
    torch.testing.assert_close(default, generator.generate(prompt, seconds, seed=1, cfg_coef=6.0).wav)
    assert not torch.allclose(default, generator.generate(prompt, seconds, seed=1, cfg_coef=3.0).wav)
    # a sampling config given whole is taken as it is (its cfg_coef included)
    given = generator.generate(prompt, seconds, seed=1, sampling=SamplingConfig()).wav
    torch.testing.assert_close(given, generator.generate(prompt, seconds, seed=1, cfg_coef=3.0).wav)
    # the one-call API and the streaming generator take the same default
    torch.testing.assert_close(api_generate(prompt, seconds, model=guided_folder, seed=1).wav, default)
    streamed = torch.cat(list(generator.generate_stream(prompt, seconds, seed=1)), dim=-1)
    torch.testing.assert_close(streamed, default[..., : streamed.shape[-1]], atol=1e-5, rtol=0)


def test_cli_uses_the_models_guidance_unless_told(tmp_path, capsys, guided_folder):
    generator = MusicGen.from_pretrained(guided_folder)
    for extra, cfg in (([], 6.0), (["--cfg-coef", "2"], 2.0)):
        out = tmp_path / f"out{cfg:g}.wav"
        code = cli.main(["generate", "calm piano", "-o", str(out), "--model", str(guided_folder), "--duration",
                         "0.1", "--seed", "1", "--subtype", "FLOAT", "-q", *extra])
        assert code == 0, capsys.readouterr().err
        expected = generator.generate(["calm piano"], 0.1, seed=1, cfg_coef=cfg).wav[0]
        torch.testing.assert_close(audio.read_audio(out)[0], expected, atol=1e-6, rtol=0)
    code = cli.main(["generate", "calm piano", "-o", str(tmp_path / "bad.wav"), "--model", str(guided_folder),
                     "--cfg-coef", "nan"])
    assert code != 0 and "--cfg-coef must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "bad.wav").exists()


def test_demo_guidance_slider_follows_the_model(guided_folder):
    pytest.importorskip("gradio")
    from demos import app

    summary, _, guidance = app.on_model("", str(guided_folder))
    assert "Cannot" not in summary and guidance["value"] == 6.0
