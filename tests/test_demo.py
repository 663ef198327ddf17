"""The demo's handlers, called directly, and the Gradio app served on localhost.

A tiny generator (lookup-table text, 2-layer LM over 4 codebooks of 16 codes, an 800 Hz random
codec with hop 4) is saved to a folder as a user's checkpoint would be; the handlers load it
from there. The app tests need gradio (skipped without it; the handler tests do not): one goes
through gradio's queue with gradio_client, one drives Debian's headless ``chromium`` with
Playwright (skipped without both) and saves screenshots.
"""
from __future__ import annotations

import io
import os
import shutil
import socket
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from codec import ecdc
from codec.model import EncodecConfig
from conditioning import ConditionProvider, LUTConditioner
from demos import app
from inference.cli import random_model
from inference.generator import GeneratorConfig, MusicGen
from lm import LMConfig, LMModel

SR, HOP = 800, 4
CODEC = EncodecConfig(name="tiny_demo_codec", sample_rate=SR, channels=1, causal=False, ratios=(2, 2), n_filters=4,
                      dimension=8, num_codebooks=4, codebook_size=16, true_skip=True, lstm=1, pad_mode="constant",
                      target_bandwidths=(3.2,))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A models folder holding one tiny generator and one folder that is not a model."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    lm = LMModel(LMConfig(dim=32, num_heads=4, num_layers=2, ffn_dim=64, num_codebooks=4, card=16))
    text = LUTConditioner(vocab=["calm", "piano", "happy", "rock"], dim=8, output_dim=32)
    generator = MusicGen(lm=lm, codec=random_model(CODEC), condition_provider=ConditionProvider({"description": text}),
                         config=GeneratorConfig(max_duration=0.2, extend_stride=0.1))
    generator.save_pretrained(root / "tiny")
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a model")
    return root


@pytest.fixture()
def workdir(tmp_path):
    return tmp_path / "out"


def test_generation_handler_writes_what_it_returns(models, workdir):
    seen = []
    result = app.generate_music("calm piano\nhappy rock", duration=0.25, seed=5, model=str(models / "tiny"),
                                workdir=workdir, progress=lambda fraction, text: seen.append(fraction))
    assert [c.prompt for c in result.clips] == ["calm piano", "happy rock"]
    for clip in result.clips:
        assert clip.sample_rate == SR and clip.audio.shape == (50 * HOP, 1)  # 0.25 s = 50 frames of 4 samples
        data, rate = sf.read(clip.path, dtype="float32", always_2d=True)
        assert rate == SR and data.shape == clip.audio.shape
        np.testing.assert_allclose(data, clip.audio, atol=1 / 32_000)  # 16-bit file
        assert clip.spectrogram.dtype == np.uint8 and clip.spectrogram.shape[2] == 3
    assert "seed 5" in result.info and "UNTRAINED" not in result.info
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen) and len(seen) > 3
    again = app.generate_music("calm piano\nhappy rock", duration=0.25, seed=5, model=app.RANDOM_MODEL,
                               model_path=str(models / "tiny"), workdir=workdir)  # the typed folder wins
    np.testing.assert_array_equal(again.clips[1].audio, result.clips[1].audio)
    other = app.generate_music("calm piano", duration=0.25, seed=6, model=str(models / "tiny"), workdir=workdir)
    assert not np.array_equal(other.clips[0].audio, result.clips[0].audio)
    drawn = app.generate_music("calm piano", duration=0.1, seed=-1, model=str(models / "tiny"), workdir=workdir)
    assert f"seed {drawn.seed}" in drawn.info and drawn.seed >= 0


def test_continuation_starts_with_the_audio_prompt(models, workdir, tmp_path):
    first = app.generate_music("calm", duration=0.1, seed=1, model=str(models / "tiny"), workdir=workdir)
    result = app.generate_music("", duration=0.25, seed=2, model=str(models / "tiny"), workdir=workdir,
                                audio_prompt=str(first.clips[0].path))
    assert result.clips[0].audio.shape == (50 * HOP, 1) and result.clips[0].prompt == ""


def test_bad_requests_are_messages(models, workdir, tmp_path):
    tiny = str(models / "tiny")
    garbage = tmp_path / "broken.wav"
    garbage.write_bytes(b"RIFF not really a wave file")
    long_prompt = tmp_path / "long.wav"
    sf.write(long_prompt, np.zeros(SR), SR)
    cases = [
        (dict(prompts="   \n "), "Type a prompt"),
        (dict(prompts="calm", duration=1e6), "Duration"),
        (dict(prompts="calm", duration=float("nan")), "Duration"),
        (dict(prompts="calm", temperature=0), "Temperature"),
        (dict(prompts="a\nb\nc\nd\ne"), "At most 4"),
        (dict(prompts="calm", audio_prompt=str(garbage)), "Cannot read the audio prompt"),
        (dict(prompts="calm", melody=str(long_prompt)), "no melody"),
        (dict(prompts="calm", audio_prompt=str(long_prompt), duration=0.5), "shorter than the duration"),
        (dict(prompts="calm", model_path=str(tmp_path / "missing")), "Cannot load the model"),
        (dict(prompts="calm", model_path=str(models / "notes")), "Cannot load the model"),
    ]
    for kwargs, message in cases:
        with pytest.raises(app.DemoError, match=message):
            app.generate_music(**{"model": tiny, "duration": 0.1, "workdir": workdir, **kwargs})


def test_codec_handler_reports_the_real_size(models, workdir, tmp_path):
    codec = str(models / "tiny" / "codec")
    assert [n for _, n in app.bitrate_choices(codec)] == [1, 2, 3, 4]  # one target bandwidth: every count
    source = tmp_path / "tone.wav"
    sf.write(source, 0.3 * np.sin(2 * np.pi * 440 * np.arange(16_000) / 16_000), 16_000)  # 1 s at 16 kHz
    result = app.codec_roundtrip(str(source), codec, 2, workdir=workdir)
    data = result.ecdc_path.read_bytes()
    assert result.ecdc_bytes == len(data) and ecdc.read_header(data)[0].num_codebooks == 2
    assert result.sample_rate == SR and result.audio.shape == (SR, 1)
    assert result.kbps == pytest.approx(len(data) * 8 / 1.0 / 1000)
    assert f"{len(data):,} bytes" in result.info and f"{result.kbps:.2f} kbps" in result.info
    decoded, rate = sf.read(result.decoded_path, always_2d=True)
    assert rate == SR and decoded.shape == (SR, 1)
    with pytest.raises(app.DemoError, match="Upload an audio file"):
        app.codec_roundtrip(None, codec, 2, workdir=workdir)
    with pytest.raises(app.DemoError, match="No entropy-coding LM"):
        app.codec_roundtrip(str(source), codec, 2, use_lm=True, workdir=workdir)
    with pytest.raises(app.DemoError, match="num_codebooks"):
        app.codec_roundtrip(str(source), codec, 9, workdir=workdir)
    with pytest.raises(app.DemoError, match="Cannot load the codec"):
        app.codec_roundtrip(str(source), str(tmp_path / "nowhere"), 2, workdir=workdir)


def test_model_discovery(models, monkeypatch):
    found = app.find_generators(models)
    shipped = str((Path(__file__).parents[1] / "assets" / "models" / "tokenwave-small").resolve())
    assert [c.value for c in found] == [str((models / "tiny").resolve()), shipped]
    choices, default = app.model_choices(None, models)
    assert default == shipped and choices[-1].value == app.RANDOM_MODEL  # the shipped model first
    assert "UNTRAINED" in choices[-1].label
    monkeypatch.setenv("TOKENWAVE_MODELS", str(models / "notes"))
    choices, default = app.model_choices(None)
    assert default == app.RANDOM_MODEL or default.startswith(str(Path(__file__).parents[1] / "assets"))
    assert app.model_choices(app.RANDOM_MODEL, models)[1] == app.RANDOM_MODEL
    with pytest.raises(app.DemoError, match="--model"):
        app.model_choices("no-such-model", models)
    codecs = app.codec_choices(models)
    assert str((models / "tiny" / "codec").resolve()) in [c.value for c in codecs]
    assert codecs[-1].value.startswith("random:")


def test_untrained_stand_in_is_labelled(workdir):
    result = app.generate_music("calm piano", duration=0.1, seed=0, model=app.RANDOM_MODEL, workdir=workdir)
    assert "UNTRAINED" in result.info and result.clips[0].sample_rate == 32_000
    assert result.clips[0].audio.shape == (3_200, 1) and np.abs(result.clips[0].audio).max() <= 0.26
    assert "UNTRAINED" in app.model_summary(app.RANDOM_MODEL)


def test_spectrogram_puts_high_notes_higher():
    rate = 32_000
    t = np.arange(rate) / rate
    rows = []
    for hz in (200.0, 4_000.0):
        image = app.spectrogram_image(np.sin(2 * np.pi * hz * t), rate, width=64, height=100)
        assert image.shape == (100, 64, 3) and image.dtype == np.uint8
        rows.append(int(image.astype(int).sum(axis=(1, 2)).argmax()))
    assert rows[1] < rows[0]  # row 0 is the top of the picture: high frequencies


def test_cli_has_a_demo_command(monkeypatch):
    import builtins

    from inference.cli import build_parser, main

    args = build_parser().parse_args(["demo", "--port", "7999", "--model", "x"])
    assert (args.host, args.port, args.model, args.share) == ("127.0.0.1", 7999, "x", False)
    real_import = builtins.__import__

    def no_gradio(name, *rest, **kwargs):
        if name == "gradio":
            raise ImportError("no gradio here")
        return real_import(name, *rest, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gradio)
    assert main(["demo"]) == 1


# -- the app itself (gradio), served once for the tests below ----------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(models, tmp_path_factory):
    """The app on a free localhost port: the tiny generator installed, the untrained stand-in selected."""
    pytest.importorskip("gradio")
    demo = app.launch(app.RANDOM_MODEL, host="127.0.0.1", port=_free_port(), models_dir=models,
                      workdir=tmp_path_factory.mktemp("served"), block=False)
    yield demo
    demo.close()


@pytest.mark.filterwarnings("ignore:::gradio.queueing")  # gradio's own pandas deprecations
def test_app_serves_and_generates_through_the_queue(served, models):
    import gradio as gr

    client_module = pytest.importorskip("gradio_client")
    assert isinstance(served, gr.Blocks)
    url = served.local_url
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200 and b"<html" in response.read().lower()
    client = client_module.Client(url, verbose=False)
    tiny = str((models / "tiny").resolve())
    outputs = client.predict("calm piano", 0.5, 250, 0.0, 1.0, 3.0, 4, tiny, "", None, None, api_name="/on_generate")
    audio = outputs[0]
    data, rate = sf.read(audio if isinstance(audio, str) else audio["value"], always_2d=True)
    assert rate == SR and data.shape == (100 * HOP, 1)  # 0.5 s: beyond the tiny model's 0.2 s window, slid
    assert "seed 4" in outputs[-1]
    with pytest.raises(Exception, match="Type a prompt"):
        client.predict("", 0.5, 250, 0.0, 1.0, 3.0, 4, tiny, "", None, None, api_name="/on_generate")


def _chromium() -> str | None:
    return next((path for name in ("chromium", "chromium-browser", "google-chrome")
                 if (path := shutil.which(name)) is not None), None)


@pytest.mark.filterwarnings("ignore:::gradio.queueing")
def test_browser_generates_playable_audio_and_shows_errors(served, tmp_path):
    """Headless Chromium (Debian's ``chromium``) driven by Playwright: type, click, listen.

    The screenshots go to ``$TOKENWAVE_SCREENSHOTS`` when set (CI artifacts), else the test's
    temporary folder."""
    sync_api = pytest.importorskip("playwright.sync_api")
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no chromium (apt-get install -y chromium)")
    shots = Path(os.environ.get("TOKENWAVE_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            page.goto(served.local_url)
            page.get_by_text("UNTRAINED random model", exact=False).first.wait_for(timeout=30_000)
            page.get_by_label("Prompt (one per line, up to 4)").fill("a slow, sad piano ballad in A minor")
            page.get_by_label("number input for Duration (seconds)").fill("1")
            page.get_by_role("button", name="Generate").click()
            page.get_by_text("1 clip(s) of 1.0 s at 32000 Hz").wait_for(timeout=60_000)
            page.get_by_text("0:01").first.wait_for(timeout=30_000)  # the player decoded 1 s of audio
            link = page.locator("a[href*='tokenwave-'][href$='.wav']").first.get_attribute("href")
            with urllib.request.urlopen(urllib.parse.urljoin(served.local_url, link), timeout=30) as response:
                data, rate = sf.read(io.BytesIO(response.read()), always_2d=True)
            assert rate == 32_000 and data.shape == (32_000, 1)
            page.screenshot(path=str(shots / "demo-generate.png"), full_page=True)

            page.get_by_label("Prompt (one per line, up to 4)").fill("")
            page.get_by_role("button", name="Generate").click()
            page.get_by_text("Type a prompt (one per line)").first.wait_for(timeout=30_000)
            assert page.get_by_text("Traceback").count() == 0
            page.screenshot(path=str(shots / "demo-error.png"))

            page.get_by_role("tab", name="Codec").click()
            clip = Path(__file__).parents[1] / "assets" / "clip.wav"
            page.locator("input[type=file]").first.set_input_files(str(clip))
            page.get_by_role("button", name="Compress and decode").click()
            page.get_by_text("kbps real").wait_for(timeout=60_000)
            page.screenshot(path=str(shots / "demo-codec.png"), full_page=True)
        finally:
            browser.close()
    assert (shots / "demo-generate.png").stat().st_size > 10_000


@pytest.mark.filterwarnings("ignore:::gradio.queueing")
def test_app_streams_the_first_prompt_when_asked(served, models):
    """The Stream checkbox: live chunks, then the same clips as without it (gradio needs ffmpeg and
    ffprobe for live audio; without them the page says so)."""
    client_module = pytest.importorskip("gradio_client")
    client = client_module.Client(served.local_url, verbose=False)
    tiny = str((models / "tiny").resolve())
    args = ("calm piano", 0.5, 250, 0.0, 1.0, 3.0, 4, tiny, "", None, None)
    if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
        with pytest.raises(Exception, match="needs ffmpeg|needs ffprobe"):
            client.predict(*args, True, api_name="/on_generate")
        return
    outputs = client.predict(*args, True, api_name="/on_generate")
    plain = client.predict(*args, False, api_name="/on_generate")
    streamed, _ = sf.read(outputs[0] if isinstance(outputs[0], str) else outputs[0]["value"], always_2d=True)
    expected, _ = sf.read(plain[0] if isinstance(plain[0], str) else plain[0]["value"], always_2d=True)
    np.testing.assert_allclose(streamed, expected, atol=2 / 32_768)
    assert "seed 4" in outputs[-1]


def test_entropy_coding_box_follows_the_codecs_lm(models, workdir, tmp_path):
    """The demo finds a codec's LM as `tokenwave compress --lm` does (beside the codec), offers the
    box only then, and otherwise says what is missing and the command that trains it."""
    copy = tmp_path / "tiny"
    shutil.copytree(models / "tiny", copy)
    codec = str(copy / "codec")
    has_lm, note = app.entropy_lm_status(codec)
    assert not has_lm and "tiny_demo_codec_lm.th" in note and "tokenwave train-codec" in note
    assert "--train-entropy-lm" in note
    shipped = str(Path(__file__).parents[1] / "assets" / "models" / "tokenwave-small" / "codec")
    has_lm, note = app.entropy_lm_status(shipped)
    assert not has_lm and "tokenwave-small_lm.th" in note
    from codec.entropy_lm import EntropyLM

    model = app.load_codec_model(codec)
    lm = EntropyLM.for_codec(num_codebooks=model.num_codebooks, card=model.codebook_size,
                                  frame_rate=model.frame_rate)
    torch.save(lm.state_dict(), copy / "tiny_demo_codec_lm.th")  # beside the codec, in the generator folder
    assert app.entropy_lm_status(codec)[0]
    source = tmp_path / "tone.wav"
    sf.write(source, 0.3 * np.sin(2 * np.pi * 440 * np.arange(8_000) / 16_000), 16_000)
    result = app.codec_roundtrip(str(source), codec, 2, use_lm=True, workdir=workdir)
    assert ecdc.read_header(result.ecdc_path.read_bytes())[0].use_lm and "entropy coding" in result.info


def test_duration_slider_says_that_it_slides(models, tmp_path):
    pytest.importorskip("gradio")
    import gradio as gr

    assert "10 s window" in app.duration_info(10.0) and "slides" in app.duration_info(10.0)
    demo = app.build_app(str(models / "tiny"), models_dir=models, workdir=tmp_path)
    sliders = [b for b in demo.blocks.values() if isinstance(b, gr.Slider) and b.label == "Duration (seconds)"]
    assert len(sliders) == 1 and "slides" in sliders[0].info and sliders[0].maximum == app.MAX_SLIDER_SECONDS


@pytest.mark.filterwarnings("ignore:::gradio.queueing")
def test_codec_round_trip_is_an_api_endpoint(served, models, tmp_path):
    client_module = pytest.importorskip("gradio_client")
    assert "/codec_roundtrip" in served.get_api_info()["named_endpoints"]
    client = client_module.Client(served.local_url, verbose=False)
    source = tmp_path / "tone.wav"
    sf.write(source, 0.3 * np.sin(2 * np.pi * 440 * np.arange(16_000) / 16_000), 16_000)
    codec = str((models / "tiny" / "codec").resolve())
    decoded, ecdc_file, info = client.predict(client_module.handle_file(str(source)), codec, 2, False,
                                              api_name="/codec_roundtrip")
    data, rate = sf.read(decoded if isinstance(decoded, str) else decoded["value"], always_2d=True)
    assert rate == SR and data.shape == (SR, 1)
    assert ecdc.read_header(Path(ecdc_file).read_bytes())[0].num_codebooks == 2 and "bytes" in info
    with pytest.raises(Exception, match="No entropy-coding LM"):
        client.predict(client_module.handle_file(str(source)), codec, 2, True, api_name="/codec_roundtrip")


def test_non_finite_uploads_are_refused_with_the_sample(models, workdir, tmp_path):
    """Uploads go through the one finite-audio check (codec.audio.check_audio_values): the message
    names the file and the first bad sample, for the codec tab and the generation uploads alike."""
    wav = 0.1 * np.ones(SR, dtype=np.float32)
    wav[200] = np.nan
    bad = tmp_path / "nan.wav"
    sf.write(bad, wav, SR, subtype="FLOAT")  # float WAVs keep NaN; read_audio returns them as stored
    with pytest.raises(app.DemoError, match=r"upload \(nan\.wav\) holds a non-finite value .* sample 200"):
        app.codec_roundtrip(str(bad), str(models / "tiny" / "codec"), 2, workdir=workdir)
    with pytest.raises(app.DemoError, match=r"melody \(nan\.wav\) holds a non-finite value .* sample 200"):
        app.generate_music("calm", duration=0.1, model=str(models / "tiny"), melody=str(bad), workdir=workdir)
