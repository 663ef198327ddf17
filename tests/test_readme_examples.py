"""The README's examples, run as written (issue 11: a user copies them first).

Blocks are read from README.md by the section they stand in, so an edit to the README is
tested as it is published. Placeholders a user must fill in (``path/to/musicgen-small``,
``PATH_OR_NAME``) are given real folders: the Python blocks run unchanged in a working folder
where those paths exist. Blocks tested elsewhere: the codec quick start
(test_hardening_names.py), the streaming snippet (test_readme_streaming.py). Blocks not run
here: installs, training runs (test_finetune.py, test_codec_training.py run them on tiny data),
the melody line (test_melody.py) and the demo (test_demo.py).
"""
from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
import soundfile as sf
import torch

from inference import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def blocks(heading: str, language: str) -> list[str]:
    """The ``language`` code blocks under the README heading ``heading`` (up to the next one)."""
    match = re.search(rf"^#+ {re.escape(heading)}\n(.*?)(?=^#+ |\Z)", README, re.S | re.M)
    assert match, f"no section {heading!r} in README.md"
    found = re.findall(rf"```{language}\n(.*?)```", match[1], re.S)
    assert found, f"no {language} block under {heading!r} in README.md"
    return found


def commands(block: str) -> list[list[str]]:
    """``tokenwave ...`` lines of a shell block as argument lists (comments dropped)."""
    return [shlex.split(line, comments=True)[1:] for line in block.strip().splitlines()
            if line.startswith("tokenwave ")]


def run(capsys, argv: list[str]) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


def test_quick_start_command(tmp_path, monkeypatch, capsys):
    block = blocks("Quick start", "bash")[1]
    [argv] = commands(block)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()  # `make run` makes it first
    code, err = run(capsys, argv)
    assert code == 0, err
    info = sf.info("out/music.wav")
    assert info.samplerate == 32_000 and abs(info.duration - 10.0) < 0.05


def test_codec_command_line(tmp_path, monkeypatch, capsys):
    block = blocks("Command line", "bash")[0]
    lines = commands(block)
    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "assets" / "clip.wav", "song.wav")
    for argv in lines:
        if "encodec_24khz" in argv:  # needs the downloaded codec and its LM: a clear error offline
            code, err = run(capsys, argv)
            assert code != 0 and err.count("\n") == 1 and "encodec_24khz" in err, err
            continue
        code, err = run(capsys, argv)
        assert code == 0, (argv, err)
    assert sf.info("decoded.wav").duration == pytest.approx(sf.info("song.wav").duration, abs=1e-3)
    assert Path("song.ecdc").stat().st_size > 0 and Path("out.wav").is_file()
    import numpy as np

    assert np.load("song.npy").shape[0] == 4


@pytest.fixture(scope="module")
def tiny_generator_folder(tmp_path_factory) -> Path:
    from test_generator import build_tiny_generator

    root = tmp_path_factory.mktemp("readme")
    build_tiny_generator(seed=0).save_pretrained(root / "path" / "to" / "musicgen-small")
    return root


def test_generation_python_block(tiny_generator_folder, monkeypatch):
    block = blocks("Text-to-music generation", "python")[0]
    assert 'from_pretrained("path/to/musicgen-small")' in block
    monkeypatch.chdir(tiny_generator_folder)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    wav, sr = namespace["wav"], namespace["sr"]
    assert wav.shape[0] == 2 and abs(wav.shape[-1] / sr - 10) < 0.05
    assert torch.isfinite(wav).all()


def test_generation_command_lines(tiny_generator_folder, tmp_path, monkeypatch, capsys):
    block = blocks("Text-to-music generation", "bash")[0]
    model = str(tiny_generator_folder / "path" / "to" / "musicgen-small")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("calm piano\n\nfast drums\n")
    clip, sample_rate = sf.read(ROOT / "assets" / "clip.wav")
    sf.write("intro.wav", clip[: sample_rate // 40], sample_rate)  # shorter than the tiny window
    ran = 0
    for argv in commands(block):
        if "--melody" in argv:
            continue  # needs a melody model (test_melody.py)
        argv = [model if a in ("PATH_OR_NAME", "...") else a for a in argv]
        argv += ["--duration", "0.5"] if "--duration" not in argv else []
        argv += ["--force"]
        code, err = run(capsys, argv)
        assert code == 0, (argv, err)
        ran += 1
    assert ran == 3
    assert {p.name for p in tmp_path.glob("out*.wav")} == {"out.wav", "out_0.wav", "out_1.wav"}


def test_streaming_generation_python_block():
    block = blocks("Streaming generation", "python")[0]
    chunks: list[torch.Tensor] = []
    exec(compile(block, "README.md", "exec"), {"play": chunks.append})
    wav = torch.cat(chunks, dim=-1)
    assert len(chunks) > 2 and abs(wav.shape[-1] / 32_000 - 30) < 0.05


def test_public_models_python_block(tmp_path, monkeypatch):
    """Run against a local hub (tests/hub_server.py) serving tiny stand-ins under the public names."""
    pytest.importorskip("transformers")
    import transformers
    from hub_server import HubServer, read_folder
    from t5_fixture import build_tiny_t5
    from test_musicgen_oracle import build_and_save, codec_config

    from inference import hub

    build_and_save(tmp_path / "musicgen", build_tiny_t5(tmp_path / "t5"), seed=0)
    torch.manual_seed(0)
    transformers.EncodecModel(codec_config()).save_pretrained(str(tmp_path / "encodec"))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", *hub.OFFLINE_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TOKENWAVE_MODELS", str(tmp_path / "models"))
    with HubServer() as server:
        server.add_repo("facebook/musicgen-small", read_folder(tmp_path / "musicgen"))
        server.add_repo("facebook/encodec_24khz", read_folder(tmp_path / "encodec"))
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        namespace: dict = {}
        exec(compile(blocks("Public models", "python")[0], "README.md", "exec"), namespace)
    out, pinned = namespace["out"], namespace["pinned"]
    assert out.wav.shape[-1] / out.sample_rate == pytest.approx(8, abs=0.05)
    assert type(pinned) is type(namespace["model"]) and namespace["codec"].sample_rate > 0
