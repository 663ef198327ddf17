"""Generation holds up against absurd input (issue 11): long prompts, long durations, bad numbers.

The text encoder reads at most ``max_tokens`` tokens of a prompt (with a warning), so a
20,000-word prompt costs what a 512-token one does; the sliding-window plan is lazy and a
duration is at most an hour; sampling arguments are checked once, before any work; a
continuation prompt that fills the window is refused in seconds; a closed stdout ends a
``--stdout`` stream quietly. Subprocess tests run the shipped model (``tokenwave-small``).
"""
from __future__ import annotations

import itertools
import math
import os
import re
import subprocess
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path

import pytest
import torch
from t5_fixture import tiny_t5_folder  # noqa: F401  (fixture)
from test_generator import FRAME_RATE, HOP, SR, build_tiny_generator, frames

from conditioning import LUTConditioner, T5Conditioner
from conditioning.text import CHARS_PER_TOKEN, MAX_TEXT_TOKENS, tokenizer_limit
from inference import MusicGen, api, cli
from inference import generator as generator_module
from inference.config import MAX_DURATION, iter_windows, plan_windows
from inference.registry import SHIPPED_MODELS
from lm.sampling import GenerationArgumentError, check_sampling

ROOT = Path(__file__).resolve().parents[1]
WORDS = "calm piano melody at night with soft drums warm bass and a slow jazz guitar".split()


def long_text(words: int) -> str:
    return " ".join(itertools.islice(itertools.cycle(WORDS), words))


@pytest.fixture(scope="module")
def generator() -> MusicGen:
    return build_tiny_generator()


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


# -- 1. a long prompt ------------------------------------------------------------------------------

def test_tokenizer_limit_is_the_stated_one_or_t5s():
    class Stated:
        model_max_length = 77

    class Unbounded:  # transformers' "no limit"
        model_max_length = int(1e30)

    assert tokenizer_limit(Stated()) == 77
    assert tokenizer_limit(Unbounded()) == MAX_TEXT_TOKENS == 512
    assert tokenizer_limit(object()) == 512


def test_t5_reads_at_most_max_tokens_with_a_warning(tiny_t5_folder):  # noqa: F811
    capped = T5Conditioner.from_pretrained(tiny_t5_folder, output_dim=8, max_tokens=8)
    free = T5Conditioner.from_pretrained(tiny_t5_folder, output_dim=8)
    texts = [long_text(40), "calm piano", None]
    with pytest.warns(UserWarning, match=r"prompt\(s\) 0 too long.*first 8 tokens"):
        tokens = capped.tokenize(texts)
    assert tokens.input_ids.shape[-1] == 8 and tokens.mask[0].sum() == 8
    assert tokens.input_ids[0, -1] == capped.tokenizer.eos_token_id  # </s> kept, as T5 was trained
    full = free.tokenize(texts)
    assert full.input_ids.shape[-1] > 8  # the same text does exceed the cap
    assert torch.equal(tokens.input_ids[0, :7], full.input_ids[0, :7])
    assert torch.equal(tokens.input_ids[1:, :6], full.input_ids[1:, :6])  # short prompts untouched
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for prompts that fit
        assert torch.equal(capped.tokenize(["calm piano"]).input_ids, free.tokenize(["calm piano"]).input_ids)
    with pytest.warns(UserWarning, match="too long"):
        condition = capped.encode(texts)
    assert condition.embeddings.shape == (3, 8, 8)


def test_text_is_cut_in_characters_before_tokenizing(tiny_t5_folder):  # noqa: F811
    """Tokenizing stays bounded: the tokenizer never sees more than CHARS_PER_TOKEN * cap characters."""
    conditioner = T5Conditioner.from_pretrained(tiny_t5_folder, output_dim=8, max_tokens=16)
    seen = []
    tokenizer = conditioner.tokenizer

    def spy(texts, **kwargs):
        seen.extend(len(t) for t in texts)
        return tokenizer(texts, **kwargs)

    conditioner.tokenizer = spy
    with pytest.warns(UserWarning, match="too long"):
        tokens = conditioner.tokenize([long_text(20_000), "calm"])
    assert max(seen) <= CHARS_PER_TOKEN * 16 and tokens.input_ids.shape[-1] == 16


def test_lookup_table_conditioner_is_capped_too():
    lut = LUTConditioner(vocab=WORDS, dim=4, output_dim=4, max_tokens=5)
    with pytest.warns(UserWarning, match="first 5 tokens"):
        tokens = lut.tokenize([long_text(30), "calm piano"])
    assert tokens.input_ids.shape == (2, 5) and tokens.mask.sum(-1).tolist() == [5, 2]


def test_a_20000_word_prompt_stays_under_1_gb(tmp_path):
    """The whole CLI run, shipped model: peak RSS of the process < 1 GB (it was 23.6 GB)."""
    script = tmp_path / "child.py"
    script.write_text(
        "import resource, sys\n"
        # A guard for this machine: a regression fails with MemoryError instead of exhausting it.
        "resource.setrlimit(resource.RLIMIT_DATA, (4 << 30, 4 << 30))\n"
        "from inference.cli import main\n"
        "text = open(sys.argv[1]).read()\n"
        "code = main(['generate', text, '-o', sys.argv[2], '--duration', '1', '--seed', '0', '-q'])\n"
        # VmHWM, not ru_maxrss: the latter keeps the forking parent's (pytest's) high-water mark
        # across exec, VmHWM belongs to this process's own memory map.
        "hwm = next(line for line in open('/proc/self/status') if line.startswith('VmHWM:'))\n"
        "print(code, int(hwm.split()[1]))\n")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(long_text(20_000))
    out = tmp_path / "long.wav"
    result = subprocess.run([sys.executable, str(script), str(prompt), str(out)], capture_output=True, text=True,
                            env=child_env(), cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    code, peak_kib = map(int, result.stdout.split())
    assert code == 0 and out.is_file()
    assert peak_kib * 1024 < 1 << 30, f"peak RSS {peak_kib / 1024:.0f} MB"
    assert "too long" in result.stderr and "512 tokens" in result.stderr and "Traceback" not in result.stderr


# -- 2. durations, the window plan, progress ----------------------------------------------------------

def test_window_plan_is_lazy():
    started = time.perf_counter()
    windows = iter_windows(10**15, 500, 300)  # a plan of ~3e12 windows: never built
    first = list(itertools.islice(windows, 3))
    assert time.perf_counter() - started < 1.0
    assert first == [(0, 500, 0), (300, 500, 200), (600, 500, 200)]
    assert list(iter_windows(46, 20, 12)) == plan_windows(46, 20, 12)
    with pytest.raises(ValueError, match="extend"):  # checked when asked, not when iterated
        iter_windows(46, 20, None)


@pytest.mark.parametrize("duration", [MAX_DURATION + 1, 1e9, math.inf, math.nan, 0.0, -1.0])
def test_durations_no_one_means_are_refused(generator, duration):
    with pytest.raises(ValueError, match=r"duration .*at most 3600 \(1 hour\)"):
        generator.generate("happy", duration)


@pytest.mark.parametrize("options,argument", [
    (dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature=math.nan), "temperature"), (dict(temperature=math.inf), "temperature"),
    (dict(cfg_coef=math.nan), "cfg_coef"), (dict(cfg_coef=-math.inf), "cfg_coef"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_p=2.0), "top_p"),
    (dict(top_p=math.nan), "top_p"), (dict(seed=1e20), "seed"), (dict(seed=2**70), "seed"),
    (dict(extend_stride=0.0), "extend_stride"), (dict(extend_stride=-1.0), "extend_stride"),
    (dict(extend_stride=math.nan), "extend_stride"), (dict(extend_stride=0.1), "extend_stride"),
])
def test_bad_arguments_raise_before_any_work(generator, monkeypatch, options, argument):
    def no_work(*args, **kwargs):
        raise AssertionError("the LM ran")

    monkeypatch.setattr(generator.lm, "generate_iter", no_work)
    for call in (lambda: generator.generate("happy", 0.05, **options),
                 lambda: next(generator.generate_stream("happy", 0.05, **options))):
        with pytest.raises(GenerationArgumentError) as raised:
            call()
        assert raised.value.argument == argument and str(raised.value).startswith(argument)


def test_the_one_call_api_checks_before_loading_a_model(monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(api, "load", no_load)
    for call in (api.generate, api.generate_stream):
        with pytest.raises(GenerationArgumentError, match="duration"):
            call("calm", 1e9)
        with pytest.raises(GenerationArgumentError, match="use_sampling=False"):
            call("calm", 5, temperature=0)


def test_temperature_zero_is_refused_with_a_hint_to_greedy(generator):
    with pytest.raises(ValueError, match="use_sampling=False"):
        generator.generate("happy", 0.05, temperature=0.0)
    with pytest.raises(ValueError, match="use_sampling=False"):
        generator.lm.generate(max_gen_len=4, num_samples=1, temperature=0.0)
    greedy = generator.generate("happy", 0.05, use_sampling=False, return_tokens=True).tokens
    cold = generator.generate("happy", 0.05, use_sampling=False, temperature=0.0, return_tokens=True).tokens
    assert torch.equal(greedy, cold)  # with sampling off the temperature does not matter
    check_sampling(use_sampling=False, temperature=0.0)
    with pytest.raises(GenerationArgumentError, match="temperature"):
        check_sampling(use_sampling=False, temperature=math.nan)  # absurd either way


def test_progress_bar_counts_windows(generator, capsys):
    generator.generate("happy", 0.23, seed=0, progress=True)  # 46 frames: windows of 20, stride 12
    err = capsys.readouterr().err
    assert "window 1/4" in err and "window 4/4" in err


def test_long_outputs_are_decoded_block_by_block(generator, monkeypatch):
    tokens = torch.randint(0, 16, (2, 4, 90), generator=torch.Generator().manual_seed(0))
    whole = generator.decode(tokens)
    calls = []
    codec_decode = generator.codec.decode
    monkeypatch.setattr(generator.codec, "decode", lambda codes: calls.append(codes.shape[-1]) or codec_decode(codes))
    monkeypatch.setattr(generator_module, "DECODE_BLOCK_SECONDS", 20 / FRAME_RATE)  # blocks of 20 frames
    blocks = generator.decode(tokens)
    assert calls == []  # the streaming decoder, not one decode of 90 frames
    assert blocks.shape == whole.shape == (2, 1, 90 * HOP)
    torch.testing.assert_close(blocks, whole, atol=1e-5, rtol=0)


# -- 12. a continuation prompt that fills the window -------------------------------------------------

def test_a_prompt_as_long_as_the_window_is_refused_in_seconds(generator):
    wav = torch.zeros(1, 1, frames(0.1) * HOP)  # 20 frames: the whole 0.1 s window
    with pytest.raises(ValueError) as raised:
        generator.generate("happy", 0.3, audio_prompt=(wav, SR))
    message = str(raised.value)
    assert "the audio prompt is 0.1 s, as long as the model's window (0.1 s)" in message
    assert "shorter than 0.1 s" in message and "last 0.04 s" in message and "ffmpeg" in message
    assert "frames" not in message and "max_gen_len" not in message
    shorter = torch.zeros(1, 1, frames(0.08) * HOP)
    assert generator.generate("happy", 0.3, audio_prompt=(shorter, SR), return_tokens=True).tokens.shape[-1] == 60


# -- 13. defaults, version, help, README -----------------------------------------------------------------

def test_from_pretrained_without_a_name_is_the_shipped_model():
    model = MusicGen.from_pretrained(device="cpu")
    shipped = MusicGen.from_pretrained(SHIPPED_MODELS / "tokenwave-small", device="cpu")
    assert model.lm.config == shipped.lm.config and model.max_duration == shipped.max_duration


def test_readme_states_the_shipped_lm_parameter_count():
    model = MusicGen.from_pretrained(SHIPPED_MODELS / "tokenwave-small", device="cpu")
    count = sum(p.numel() for p in model.lm.parameters())
    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| LM |"))
    stated = float(re.search(r"([\d.]+) M parameters", row).group(1))
    assert stated == round(count / 1e6, 2), (stated, count)


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out.split()
    try:
        expected = metadata.version("tokenwave")
    except metadata.PackageNotFoundError:
        expected = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert out == ["tokenwave", expected]


def test_duration_help_states_the_limit_and_where_the_window_comes_from(capsys):
    assert cli.main(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "at most 3600 = 1 hour" in text and "window (its own: 10 s for tokenwave-small" in text
    assert "--greedy" in text


# -- 13. a closed stdout ---------------------------------------------------------------------------------

@pytest.mark.parametrize("with_file", [False, True])
def test_stdout_closed_by_the_reader_ends_quietly(tmp_path, with_file):
    """``tokenwave generate ... --stdout | head -c 10``: no traceback, no 'Exception ignored'."""
    out = tmp_path / "also.wav"
    argv = [sys.executable, "-m", "inference", "generate", "calm piano", "--stdout", "--duration", "600",
            "--seed", "0", "-q", "--chunk-frames", "5"] + (["-o", str(out)] if with_file else [])
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(), cwd=tmp_path)
    assert len(process.stdout.read(10)) == 10
    process.stdout.close()  # what head does after 10 bytes
    started = time.perf_counter()
    err = process.communicate(timeout=300)[1].decode()
    assert time.perf_counter() - started < 60  # it stopped, it did not generate the 10 minutes
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err
    if with_file:
        assert process.returncode == 1 and err.count("\n") == 1 and "not written" in err
        assert not out.exists()
    else:
        assert process.returncode == 0 and err == ""
