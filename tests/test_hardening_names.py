"""Codec names and identity (issue 11, items 6 and 10): the shipped codec is reachable by the
generator's name, .ecdc files of non-public codecs record a weights id and decoding refuses other
weights, the README's codec quick start runs with no download, and a codec without an entropy
LM says what is missing and how to make it."""
from __future__ import annotations

import io
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from codec import EncodecModel, ecdc
from codec.ecdc import EcdcError
from codec.formats import load_model, save_model, weights_id
from codec.model import EncodecConfig
from codec.pretrained import EntropyLMNotFoundError, entropy_lm_for, find_entropy_lm
from inference import cli

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "assets" / "models" / "tokenwave-small"
TWIN = EncodecConfig(name="twin", sample_rate=8_000, n_filters=2, dimension=8, num_codebooks=4, codebook_size=32,
                     lstm=1, target_bandwidths=(0.75, 1.5))


@pytest.fixture(autouse=True)
def _empty_models_folder(tmp_path, monkeypatch):
    """No installed models: names must resolve to the repository's shipped folder."""
    monkeypatch.setenv("TOKENWAVE_MODELS", str(tmp_path / "models"))
    monkeypatch.delenv("TOKENWAVE_ALLOW_DOWNLOAD", raising=False)


def tone(seconds: float, rate: int) -> torch.Tensor:
    t = torch.arange(int(seconds * rate)) / rate
    return (0.3 * torch.sin(2 * torch.pi * 330 * t))[None]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- names ----------------------------------------------------------------------------------------
def test_the_shipped_codec_has_its_own_name():
    config = json.loads((SHIPPED / "codec" / "config.json").read_text())
    assert config["name"] == "tokenwave-small"


def test_a_generator_name_or_folder_loads_its_codec(tmp_path):
    by_name = EncodecModel.from_pretrained("tokenwave-small")
    by_folder = load_model(SHIPPED)
    direct = load_model(SHIPPED / "codec")
    assert by_name.name == by_folder.name == "tokenwave-small" and by_name.sample_rate == 32_000
    for a, b in zip(by_name.state_dict().values(), direct.state_dict().values()):
        assert torch.equal(a, b)
    assert weights_id(by_name) == weights_id(by_folder) == weights_id(direct)


def test_codec_commands_take_the_shipped_model_by_name(tmp_path, capsys):
    sf.write(tmp_path / "song.wav", tone(0.5, 44_100)[0].numpy(), 44_100)
    code, out, err = run(capsys, "roundtrip", tmp_path / "song.wav", tmp_path / "out.wav", "--model",
                         "tokenwave-small", "--bandwidth", "0.9")
    assert code == 0, err
    assert "tokenwave-small" in out and sf.info(str(tmp_path / "out.wav")).samplerate == 32_000
    code, _, err = run(capsys, "compress", tmp_path / "song.wav", tmp_path / "song.ecdc", "--model",
                       "tokenwave-small", "-b", "1.8")
    assert code == 0, err
    header = ecdc.read_header((tmp_path / "song.ecdc").read_bytes())[0]
    assert header.model_name == "tokenwave-small"
    assert header.weights_id == weights_id(load_model(SHIPPED / "codec"))
    code, _, err = run(capsys, "decompress", tmp_path / "song.ecdc", tmp_path / "back.wav")  # no --model
    assert code == 0, err


def test_the_readme_codec_quick_start_runs_as_written(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## The codec\n", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S)[1]
    assert "from_pretrained(\"tokenwave-small\")" in block
    monkeypatch.chdir(tmp_path)
    sf.write("song.flac", tone(0.4, 44_100)[0].numpy(), 44_100)  # the stand-in for the user's song
    exec(compile(block, "README.md", "exec"), {})
    info = sf.info("roundtrip.wav")
    assert info.samplerate == 32_000 and info.frames == round(0.4 * 32_000)


# -- identity ---------------------------------------------------------------------------------------
def twin(seed: int):
    return cli.random_model(TWIN, seed=seed)


def test_files_record_the_weights_and_other_weights_are_refused(tmp_path):
    writer, other = twin(1), twin(2)
    wav = tone(0.3, 8_000)
    data = ecdc.compress(wav, 8_000, writer, num_codebooks=2)
    header = ecdc.read_header(data)[0]
    assert header.model_name == other.name == "twin"
    assert header.weights_id == weights_id(writer) != weights_id(other)
    assert re.fullmatch(r"[0-9a-f]{8}", header.weights_id)
    with pytest.raises(EcdcError, match=rf"written by codec 'twin' \(weights {header.weights_id}\); the codec "
                                        rf"given has weights {weights_id(other)}"):
        ecdc.decompress(data, other)
    decoded, _ = ecdc.decompress(data, writer)
    assert decoded.shape == wav.shape
    # Saved and loaded again, the codec keeps its identity: files of the saved copy decode with it.
    save_model(writer, tmp_path / "twin")
    assert weights_id(load_model(tmp_path / "twin")) == header.weights_id
    ecdc.decompress(data, models_dir=tmp_path)  # found by name, same weights
    save_model(other, tmp_path / "twin", overwrite=True)  # another codec under the same name
    with pytest.raises(EcdcError, match="weights"):
        ecdc.decompress(data, models_dir=tmp_path)


def test_the_cli_refuses_a_same_named_codec_with_other_weights(tmp_path, capsys, monkeypatch):
    models = tmp_path / "models"
    monkeypatch.setenv("TOKENWAVE_MODELS", str(models))
    save_model(twin(1), models / "twin")
    sf.write(tmp_path / "in.wav", tone(0.3, 8_000)[0].numpy(), 8_000)
    assert run(capsys, "compress", tmp_path / "in.wav", tmp_path / "x.ecdc", "--model", "twin", "-n", "2")[0] == 0
    save_model(twin(2), models / "twin", overwrite=True)
    code, _, err = run(capsys, "decompress", tmp_path / "x.ecdc", tmp_path / "y.wav")
    assert code == 1 and "weights" in err and "--model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "y.wav").exists()


def test_public_codecs_write_the_original_metadata_and_the_original_reader_takes_ours():
    from oracles import import_encodec

    import_encodec()  # the original package (torchaudio stubbed where missing)
    from encodec.binary import read_ecdc_header

    public = EncodecModel(replace(EncodecModel.from_preset("encodec_24khz").config, n_filters=2, dimension=8,
                                  lstm=0)).eval()
    data = ecdc.compress(tone(0.1, 24_000), 24_000, public, num_codebooks=2)
    assert list(read_ecdc_header(io.BytesIO(data))) == ["m", "al", "nc", "lm"]  # no "w": byte-identical
    ours = ecdc.compress(tone(0.1, 8_000), 8_000, twin(1), num_codebooks=2)
    meta = read_ecdc_header(io.BytesIO(ours))  # the original's reader ignores the extra key
    assert meta["m"] == "twin" and meta["nc"] == 2 and meta["w"] == weights_id(twin(1))


def test_a_malformed_weights_id_is_refused():
    data = ecdc.compress(tone(0.1, 8_000), 8_000, twin(1), num_codebooks=2)
    header, offset = ecdc.read_header(data)
    meta = json.dumps({"m": "twin", "al": header.audio_length, "nc": 2, "lm": False, "w": "../../etc"}).encode()
    bad = b"ECDC" + bytes([0]) + len(meta).to_bytes(4, "big") + meta + data[offset:]
    with pytest.raises(EcdcError, match="'w'"):
        ecdc.read_header(bad)


def test_train_codec_refuses_a_public_name(tmp_path, capsys):
    (tmp_path / "audio").mkdir()
    code, _, err = run(capsys, "train-codec", tmp_path / "audio", "--out", tmp_path / "run", "--name",
                       "encodec_24khz", "--steps", "1")
    assert code == 1 and "public codec" in err and "--name" in err


# -- entropy-coding LM -------------------------------------------------------------------------------
def test_a_codec_without_lm_names_what_is_missing_and_the_command(tmp_path, capsys):
    save_model(twin(1), tmp_path / "run" / "twin")
    sf.write(tmp_path / "in.wav", tone(0.3, 8_000)[0].numpy(), 8_000)
    code, _, err = run(capsys, "compress", tmp_path / "in.wav", tmp_path / "x.ecdc", "--model",
                       tmp_path / "run" / "twin", "-n", "2", "--lm")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "no entropy-coding LM" in err and "twin_lm.th" in err
    assert "tokenwave train-codec" in err and "--train-entropy-lm" in err
    assert "neither an existing path" not in err
    assert not (tmp_path / "x.ecdc").exists()
    code, _, err = run(capsys, "compress", tmp_path / "in.wav", tmp_path / "x.ecdc", "--model", "tokenwave-small",
                       "-b", "0.9", "--lm")
    assert code == 1 and "tokenwave-small_lm.th" in err and "--train-entropy-lm" in err


def test_the_lm_beside_a_trained_codec_is_found(tmp_path, capsys):
    """Where train-codec writes it: RUN/<name>_lm.th next to the codec RUN/<name>."""
    model = twin(1)
    save_model(model, tmp_path / "run" / "twin")
    spec = str(tmp_path / "run" / "twin")
    with pytest.raises(EntropyLMNotFoundError):
        entropy_lm_for(model, spec)
    lm = cli.random_entropy_lm(model, seed=3)
    torch.save(lm.state_dict(), tmp_path / "run" / "twin_lm.th")
    assert find_entropy_lm(model, spec) == tmp_path / "run" / "twin_lm.th"
    found = entropy_lm_for(model, spec)
    assert all(torch.equal(a, b) for a, b in zip(found.state_dict().values(), lm.state_dict().values()))
    sf.write(tmp_path / "in.wav", tone(0.3, 8_000)[0].numpy(), 8_000)
    code, _, err = run(capsys, "compress", tmp_path / "in.wav", tmp_path / "x.ecdc", "--model", spec, "-n", "2",
                       "--lm")
    assert code == 0, err
    assert ecdc.read_header((tmp_path / "x.ecdc").read_bytes())[0].use_lm
    code, _, err = run(capsys, "decompress", tmp_path / "x.ecdc", tmp_path / "x.wav", "--model", spec)
    assert code == 0, err
    assert np.isfinite(sf.read(tmp_path / "x.wav")[0]).all()
