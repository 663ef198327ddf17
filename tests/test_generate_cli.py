"""``tokenwave generate``: prompt -> T5 -> LM tokens -> codec -> audio file, run in-process.

The model is a real T5 structure (random small ``T5Config``, a sentencepiece model trained in
the test, ``t5_fixture``) with a tiny LM and codec, saved in tokenwave's format (and in
audiocraft's) under ``$TOKENWAVE_MODELS``. Files are written as float so they can be compared
with the Python API's output for the same seed.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from t5_fixture import tiny_t5_folder  # noqa: F401  (fixture)
from test_generator import AUDIOCRAFT_YAML, SR, build_tiny_generator, write_audiocraft

from codec import audio
from inference import MusicGen, cli


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_t5_folder):  # noqa: F811
    root = tmp_path_factory.mktemp("models")
    generator = build_tiny_generator(t5_folder=tiny_t5_folder, seed=11)
    generator.save_pretrained(root / "tiny-musicgen")
    write_audiocraft(root / "tiny-audiocraft", generator, {**AUDIOCRAFT_YAML, "conditioners": {
        "description": {"model": "t5", "t5": {"name": "t5-elsewhere", "finetune": False}}}})
    return root


@pytest.fixture(autouse=True)
def _models_env(models_dir, monkeypatch):
    monkeypatch.setenv("TOKENWAVE_MODELS", str(models_dir))


@pytest.fixture(scope="module")
def generator(models_dir) -> MusicGen:
    return MusicGen.from_pretrained(models_dir / "tiny-musicgen", device="cpu")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def read(path):
    wav, sr = audio.read_audio(path)
    assert sr == SR
    return wav


def test_prompt_to_waveform_file(tmp_path, capsys, generator):
    out = tmp_path / "song.wav"
    code, stdout, err = run(capsys, "generate", "happy rock song with drums", "-o", out,
                            "--model", "tiny-musicgen", "--duration", "0.05", "--seed", "0", "--subtype", "FLOAT")
    assert code == 0, err
    assert "song.wav" in stdout and "0.05 s" in stdout
    expected = generator.generate("happy rock song with drums", 0.05, seed=0).wav[0]
    written = read(out)
    assert written.shape == (1, 40)
    torch.testing.assert_close(written, expected, atol=1e-6, rtol=0)


def test_several_prompts_and_a_prompts_file(tmp_path, capsys, generator):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("calm piano melody at night\n\n  lofi hip hop beat  \n", encoding="utf-8")
    out = tmp_path / "out.wav"
    code, stdout, err = run(capsys, "generate", "happy rock", "-o", out, "--model", "tiny-musicgen",
                            "--prompts-file", prompts_file, "--duration", "0.04", "--seed", "3",
                            "--batch-size", "2", "--top-k", "5", "--temperature", "0.8", "--cfg-coef", "2",
                            "--subtype", "FLOAT", "-q")
    assert code == 0, err
    assert stdout == ""
    assert sorted(p.name for p in tmp_path.glob("out*.wav")) == ["out_0.wav", "out_1.wav", "out_2.wav"]
    # The second batch holds the third prompt alone, with seed 3 + 2.
    expected = generator.generate(["lofi hip hop beat"], 0.04, seed=5, top_k=5, temperature=0.8, cfg_coef=2.0).wav
    torch.testing.assert_close(read(tmp_path / "out_2.wav"), expected[0], atol=1e-6, rtol=0)
    first = generator.generate(["happy rock", "calm piano melody at night"], 0.04, seed=3, top_k=5,
                               temperature=0.8, cfg_coef=2.0).wav
    torch.testing.assert_close(read(tmp_path / "out_1.wav"), first[1], atol=1e-6, rtol=0)


def test_continuation_from_an_audio_file(tmp_path, capsys, generator):
    source = tmp_path / "start.wav"
    t = torch.arange(2 * 25) / (2 * SR)  # 25 samples at the model's 800 Hz: 7 frames
    audio.write_audio(source, 0.5 * torch.sin(2 * torch.pi * 60 * t)[None], 2 * SR, subtype="FLOAT")  # 1600 Hz
    out = tmp_path / "continued.wav"
    code, _, err = run(capsys, "generate", "calm piano", "-o", out, "--model", "tiny-musicgen",
                       "--duration", "0.06", "--continue", source, "--greedy", "--subtype", "FLOAT")
    assert code == 0, err
    wav, sr = audio.read_audio(source)
    expected = generator.generate("calm piano", 0.06, use_sampling=False, audio_prompt=(wav, sr),
                                  return_tokens=True)
    torch.testing.assert_close(read(out), expected.wav[0], atol=1e-6, rtol=0)
    assert torch.equal(expected.tokens[..., :7], generator.encode_audio(wav[None], sr))


def test_existing_output_needs_force(tmp_path, capsys):
    out = tmp_path / "out.wav"
    out.write_bytes(b"keep me")
    args = ["generate", "happy", "-o", out, "--model", "tiny-musicgen", "--duration", "0.02"]
    code, _, err = run(capsys, *args)
    assert code == 1 and err.count("\n") == 1 and "--force" in err
    assert out.read_bytes() == b"keep me"
    code, _, err = run(capsys, *args, "--force", "-q")
    assert code == 0, err
    assert read(out).shape == (1, 16)


def test_audiocraft_checkpoint_needs_its_t5(tmp_path, capsys, models_dir, tiny_t5_folder):  # noqa: F811
    out = tmp_path / "ac.wav"
    args = ["generate", "happy rock", "-o", out, "--model", "tiny-audiocraft", "--duration", "0.03", "--seed", "1"]
    code, _, err = run(capsys, *args)
    assert code == 1 and err.count("\n") == 1
    assert "t5-elsewhere" in err and "t5_path" in err
    code, _, err = run(capsys, *args, "--t5-path", tiny_t5_folder, "-q")
    assert code == 0, err
    shutil.copytree(tiny_t5_folder, models_dir / "t5-elsewhere")  # found by name in $TOKENWAVE_MODELS
    code, _, err = run(capsys, *args, "--force", "-q")
    assert code == 0, err


@pytest.mark.parametrize("argv,message", [
    (["happy", "-o", "{tmp}/x.wav", "--model", "no-such-model"], "not found"),
    (["-o", "{tmp}/x.wav", "--model", "tiny-musicgen"], "at least one prompt"),
    (["happy", "-o", "{tmp}/x.mp3", "--model", "tiny-musicgen"], "cannot write audio"),
    (["happy", "-o", "{tmp}/x.wav", "--model", "tiny-musicgen", "--melody", "{tmp}/missing.wav"], "missing.wav"),
    (["happy", "-o", "{tmp}/x.wav", "--model", "tiny-musicgen", "--duration", "0"], "duration"),
    (["happy", "-o", "{tmp}/x.wav", "--model", "tiny-musicgen", "--prompts-file", "{tmp}/none.txt"], "none.txt"),
])
def test_errors_are_one_line(tmp_path, capsys, argv, message):
    code, _, err = run(capsys, "generate", *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 1
    assert err.startswith("tokenwave: error:") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "x.wav").exists()


def test_melody_on_a_text_only_model(tmp_path, capsys):
    melody = tmp_path / "melody.wav"
    audio.write_audio(melody, 0.1 * torch.ones(1, 400), SR)
    code, _, err = run(capsys, "generate", "happy", "-o", tmp_path / "x.wav", "--model", "tiny-musicgen",
                       "--duration", "0.02", "--melody", melody)
    assert code == 1 and "melody" in err and err.count("\n") == 1


def test_bf16_weights_keep_float32_compute(tmp_path, capsys, models_dir):
    out = tmp_path / "song.wav"
    code, _, err = run(capsys, "generate", "calm piano", "-o", out, "--model", "tiny-musicgen",
                       "--duration", "0.05", "--seed", "0", "--subtype", "FLOAT",
                       "--dtype", "bf16-weights")
    assert code == 0, err
    reference = MusicGen.from_pretrained(models_dir / "tiny-musicgen", device="cpu")
    reference.lm.low_precision_weights(torch.bfloat16)
    assert reference.lm.linears[0].weight.dtype == torch.bfloat16
    assert reference.lm.emb[0].weight.dtype == torch.float32
    expected = reference.generate("calm piano", 0.05, seed=0).wav[0]
    torch.testing.assert_close(read(out), expected, atol=1e-6, rtol=0)
