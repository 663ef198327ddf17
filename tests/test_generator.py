"""The generator: prompts, guidance rows, sliding window, continuation, progress, seeds, formats.

Tiny models built in milliseconds: a 2-layer LM over 4 codebooks of 16 codes, a random 800 Hz
codec (hop 4: 200 frames per second) and a lookup-table or tiny-T5 text conditioner.
audiocraft-format checkpoints are written the way audiocraft lays them out (torch.save of
``best_state`` + YAML ``xp.cfg`` with its config keys) and loaded back; tokenwave's format must
round-trip exactly.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import yaml
from t5_fixture import tiny_t5_folder  # noqa: F401  (fixture)

from codec.formats import save_model
from codec.model import EncodecConfig, EncodecModel
from conditioning import (
    FUSER_PRESETS,
    ChromaConditioner,
    ChromaConfig,
    ConditionFuser,
    ConditionProvider,
    LUTConditioner,
    T5Conditioner,
)
from inference import AudioGen, GeneratorConfig, MusicGen, detect_format
from inference import api, registry
from inference.cli import random_model
from inference.config import Window, plan_windows
from lm import LMConfig, LMModel
from lm.sampling import SamplingConfig

SR, HOP, FRAME_RATE = 800, 4, 200
DIM, CARD, K = 32, 16, 4
CODEC = EncodecConfig(name="tiny_codec", sample_rate=SR, channels=1, causal=False, ratios=(2, 2), n_filters=4,
                      dimension=8, num_codebooks=K, codebook_size=CARD, true_skip=True, lstm=1,
                      pad_mode="constant", target_bandwidths=(3.2,))
VOCAB = "happy rock calm piano night drums synth".split()
WINDOW = GeneratorConfig(max_duration=0.1, extend_stride=0.06)  # 20 frames, stride 12


def unit_scale(module: torch.nn.Module, seed: int) -> None:
    """Unit-scale weights so that the tokens and the condition change the logits a lot."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name:
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            elif param.dim() == 2:
                param.copy_(noise / (1.0 if name.startswith("emb") or ".embed" in name else param.shape[1] ** 0.5))
            else:
                param.copy_(0.1 * noise)


def tiny_lm(seed: int = 0, **overrides) -> LMModel:
    torch.manual_seed(seed)
    settings = dict(dim=DIM, num_heads=4, num_layers=2, ffn_dim=64, num_codebooks=K, card=CARD)
    lm = LMModel(LMConfig(**{**settings, **overrides})).eval()
    unit_scale(lm, seed)
    return lm


def build_tiny_generator(*, seed: int = 0, t5_folder=None, config: GeneratorConfig = WINDOW,
                         cls: type[MusicGen] = MusicGen, codec_seed: int | None = None) -> MusicGen:
    """A tiny text-to-music generator: LUT (or tiny T5) text, cross-attention, random codec."""
    if t5_folder is None:
        text = LUTConditioner(vocab=VOCAB, dim=8, output_dim=DIM)
    else:
        text = T5Conditioner.from_pretrained(t5_folder, output_dim=DIM, empty_is_null=True)
    unit_scale(text, seed + 1)
    codec = random_model(CODEC, seed=seed if codec_seed is None else codec_seed)
    return cls(lm=tiny_lm(seed), codec=codec,
               condition_provider=ConditionProvider({"description": text}), config=config)


@pytest.fixture(scope="module")
def generator() -> MusicGen:
    return build_tiny_generator()


def frames(seconds: float) -> int:
    return math.floor(seconds * FRAME_RATE + 1e-9)


# -- prompts and outputs -----------------------------------------------------------------------------

def test_single_string_is_one_prompt(generator):
    out = generator.generate("happy rock", 0.05, seed=0, return_tokens=True)
    assert out.wav.shape == (1, 1, frames(0.05) * HOP) and out.sample_rate == SR
    assert out.tokens.shape == (1, K, frames(0.05))
    as_list = generator.generate(["happy rock"], 0.05, seed=0, return_tokens=True)
    assert torch.equal(out.tokens, as_list.tokens)
    wav, sample_rate = generator.generate("calm piano", 0.05, seed=0)  # unpacks as (wav, sr)
    assert wav.shape == (1, 1, 40) and sample_rate == SR


def test_batch_rows_are_independent_of_their_neighbours(generator):
    """Greedy decoding: each prompt's tokens do not depend on the other prompts of the batch."""
    batch = generator.generate(["happy rock", "calm piano night"], 0.06, use_sampling=False, return_tokens=True)
    alone = generator.generate("calm piano night", 0.06, use_sampling=False, return_tokens=True)
    assert torch.equal(batch.tokens[1:], alone.tokens)
    assert not torch.equal(batch.tokens[0], batch.tokens[1])  # the text conditions


def test_unconditional_prompts(generator):
    none = generator.generate([None, None], 0.05, seed=3, return_tokens=True)
    empty = generator.generate(["", ""], 0.05, seed=3, return_tokens=True)
    implicit = generator.generate(None, 0.05, seed=3, return_tokens=True)
    assert torch.equal(none.tokens, empty.tokens)
    assert torch.equal(implicit.tokens, generator.generate([None], 0.05, seed=3, return_tokens=True).tokens)
    conditions = generator.prepare_conditions([None, "happy"], guided=True)
    assert conditions.condition.shape[0] == 4
    assert conditions.condition[[0, 2, 3]].abs().max() == 0  # null rows hold zeros
    assert conditions.condition[1].abs().max() > 0


def test_seed_reproducibility(generator):
    first = generator.generate(["happy rock", "calm"], 0.08, seed=7, return_tokens=True)
    second = generator.generate(["happy rock", "calm"], 0.08, seed=7, return_tokens=True)
    other = generator.generate(["happy rock", "calm"], 0.08, seed=8, return_tokens=True)
    assert torch.equal(first.tokens, second.tokens) and torch.equal(first.wav, second.wav)
    assert not torch.equal(first.tokens, other.tokens)


def test_guidance_coefficient_changes_the_output(generator):
    guided = generator.generate("happy rock", 0.06, use_sampling=False, cfg_coef=3.0, return_tokens=True)
    plain = generator.generate("happy rock", 0.06, use_sampling=False, cfg_coef=1.0, return_tokens=True)
    two_step = generator.generate("happy rock", 0.06, use_sampling=False, two_step_cfg=True, return_tokens=True)
    assert not torch.equal(guided.tokens, plain.tokens)
    assert torch.equal(guided.tokens, two_step.tokens)


def test_progress_callback_counts_every_step(generator):
    calls = []
    generator.generate(["happy", "rock"], 0.05, seed=0, progress=lambda step, total: calls.append((step, total)))
    total = frames(0.05) + K - 1  # delay pattern: T + K - 1 steps after the empty first one
    assert calls == [(step, total) for step in range(1, total + 1)]
    generator.generate("happy", 0.05, seed=0, progress=True)  # tqdm bar on stderr


def test_defaults_are_the_documented_ones():
    import inspect

    signature = inspect.signature(MusicGen.generate)
    defaults = {name: p.default for name, p in signature.parameters.items()}
    sampling = SamplingConfig()  # the sampling defaults are written once, there
    assert defaults["duration"] == 10.0 and defaults["sampling"] is None and "top_k" not in defaults
    assert sampling.top_k == 250 and sampling.top_p == 0.0 and sampling.two_step_cfg is False
    assert sampling.temperature == 1.0 and sampling.cfg_coef == 3.0 and sampling.use_sampling is True
    assert MusicGen.default_config == GeneratorConfig(max_duration=30.0, extend_stride=18.0)
    assert AudioGen.default_config == GeneratorConfig(max_duration=10.0, extend_stride=2.0)
    assert inspect.signature(api.generate).parameters["duration"].default == 10.0


def test_a_sampling_config_is_the_same_as_its_fields_by_name(generator, monkeypatch):
    """``sampling=`` and the options by name are one thing; the arguments are checked once per call."""
    from inference import generator as generator_module

    config = SamplingConfig(top_k=3, temperature=0.7, cfg_coef=2.0)
    by_config = generator.generate("happy rock", 0.05, seed=1, sampling=config, return_tokens=True)
    by_name = generator.generate("happy rock", 0.05, seed=1, top_k=3, temperature=0.7, cfg_coef=2.0,
                                 return_tokens=True)
    mixed = generator.generate("happy rock", 0.05, seed=1, sampling=SamplingConfig(top_k=3, cfg_coef=2.0),
                               temperature=0.7, return_tokens=True)
    assert torch.equal(by_config.tokens, by_name.tokens) and torch.equal(by_config.tokens, mixed.tokens)
    default = generator.generate("happy rock", 0.05, seed=1, return_tokens=True)
    assert not torch.equal(by_config.tokens, default.tokens)
    with pytest.raises(TypeError, match="topk"):
        generator.generate("happy rock", 0.05, topk=3)

    calls = []
    original = generator_module.check_generation
    monkeypatch.setattr(generator_module, "check_generation", lambda **kw: calls.append(kw) or original(**kw))
    generator.generate("happy rock", 0.05, seed=1, top_k=3)
    assert len(calls) == 1  # not again in generate_tokens and generate_tokens_iter
    list(generator.generate_stream("happy rock", 0.05, seed=1))
    assert len(calls) == 2


def test_audiogen_text_to_sound_on_the_16khz_codec():
    """AudioGen is the same machinery on AudioGen's tokenizer (16 kHz, 50 frames/s, 4 x 2048 codes)."""
    codec = EncodecModel.from_preset("encodec_16khz").prepare_for_inference()
    text = LUTConditioner(vocab=["dog", "barking", "rain"], dim=8, output_dim=DIM)
    generator = AudioGen(lm=tiny_lm(card=2048), codec=codec,
                         condition_provider=ConditionProvider({"description": text}))
    assert generator.config == GeneratorConfig(max_duration=10.0, extend_stride=2.0)
    out = generator.generate(["dog barking", "rain"], 0.1, seed=0, return_tokens=True)
    assert out.sample_rate == 16_000 and generator.frame_rate == 50
    assert out.tokens.shape == (2, K, 5) and out.wav.shape == (2, 1, 5 * 320)


# -- continuation and the sliding window --------------------------------------------------------------

def test_continuation_keeps_the_prompt_tokens(generator):
    wav = 0.3 * torch.randn(2, 1, 7 * HOP + 2, generator=torch.Generator().manual_seed(1))
    prompt_tokens = generator.encode_audio(wav, SR)
    assert prompt_tokens.shape == (2, K, 8)  # ceil(30 / 4) frames
    out = generator.generate(["happy", "calm"], 0.09, seed=0, audio_prompt=(wav, SR), return_tokens=True)
    assert out.tokens.shape == (2, K, frames(0.09))
    assert torch.equal(out.tokens[..., :8], prompt_tokens)
    # Any rate and channel count is converted first: a 1600 Hz stereo prompt of the same length.
    stereo = wav.repeat_interleave(2, dim=-1).expand(-1, 2, -1)
    assert generator.encode_audio(stereo, 2 * SR).shape == (2, K, 8)
    # Prompt only (no text): batch size from the prompt.
    assert generator.generate(None, 0.09, audio_prompt=(wav[0], SR), return_tokens=True).tokens.shape[0] == 1


def audiocraft_windows(duration: float, max_duration: float, stride: float, prompt: int) -> list[Window]:
    """audiocraft's extension loop, written from its description in seconds (the oracle)."""
    total = int(duration * FRAME_RATE)
    stride_tokens = int(FRAME_RATE * stride)
    offset, out = 0, []
    while offset + prompt < total:
        chunk = min(duration - offset / FRAME_RATE, max_duration)
        length = int(round(chunk * FRAME_RATE, 6))
        out.append(Window(offset, length, prompt))
        prompt = length - stride_tokens
        offset += stride_tokens
    return out


@pytest.mark.parametrize("duration,prompt", [(0.23, 0), (0.4, 0), (0.31, 5), (0.2, 0), (0.05, 3)])
def test_window_plan_follows_audiocraft(duration, prompt):
    plan = plan_windows(frames(duration), 20, 12, prompt)
    if frames(duration) <= 20:
        assert plan == [Window(0, frames(duration), prompt)]
    else:
        assert plan == audiocraft_windows(duration, 0.1, 0.06, prompt)
    assert plan[-1].offset + plan[-1].length == frames(duration)


def test_sliding_window_beyond_the_training_window(generator, monkeypatch):
    calls = []
    original = generator.lm.generate_iter

    def spy(**kwargs):  # each window is one LM call, streamed frame by frame
        pieces = list(original(**kwargs))
        out = torch.cat(pieces, dim=-1)
        calls.append((kwargs["max_gen_len"], kwargs["prompt"], out))
        yield from pieces

    monkeypatch.setattr(generator.lm, "generate_iter", spy)
    steps = []
    out = generator.generate(["happy rock", None], 0.23, seed=0, return_tokens=True,
                             progress=lambda step, total: steps.append((step, total)))
    assert out.tokens.shape == (2, K, 46) and out.wav.shape == (2, 1, 46 * HOP)
    assert [c[0] for c in calls] == [20, 20, 20, 10]
    assert calls[0][1] is None
    for (_, _, previous), (_, prompt, current) in zip(calls, calls[1:]):
        assert torch.equal(prompt, previous[..., 12:])  # keep the last 8 frames (0.04 s) as prompt
        assert torch.equal(current[..., :8], prompt)
    expected = torch.cat([calls[0][2]] + [c[2][..., 8:] for c in calls[1:]], dim=-1)
    assert torch.equal(out.tokens, expected)
    assert steps[-1][0] == steps[-1][1] == len(steps)  # one count over all windows


def test_sliding_window_needs_a_stride(generator):
    no_stride = build_tiny_generator(config=GeneratorConfig(max_duration=0.1, extend_stride=None))
    with pytest.raises(ValueError, match="extend_stride"):
        no_stride.generate("happy", 0.2)
    assert no_stride.generate("happy", 0.2, extend_stride=0.05, return_tokens=True).tokens.shape[-1] == 40
    with pytest.raises(ValueError, match="extend_stride"):
        GeneratorConfig(max_duration=10.0, extend_stride=10.0)


# -- errors ---------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors(generator):
    with pytest.raises(TypeError, match="string"):
        generator.generate(b"happy", 0.05)
    with pytest.raises(ValueError, match="duration"):
        generator.generate("happy", 0.0)
    wav = torch.zeros(1, 1, 40 * HOP)
    with pytest.raises(ValueError, match="shorter than the requested duration"):
        generator.generate("happy", 0.1, audio_prompt=(wav, SR))
    with pytest.raises(ValueError, match="longer than the model's window"):
        generator.generate("happy", 0.3, audio_prompt=(wav, SR))
    with pytest.raises(ValueError, match="2 prompt"):
        generator.generate(["a", "b"], 0.05, audio_prompt=(torch.zeros(3, 1, 8), SR))
    with pytest.raises(TypeError, match="sample_rate"):
        generator.generate("a", 0.05, audio_prompt=torch.zeros(1, 1, 8))
    with pytest.raises(ValueError, match="melody"):
        generator.generate("a", 0.05, melody=(torch.zeros(1, 1, 800), SR))
    with pytest.raises(ValueError, match="card"):
        MusicGen(lm=tiny_lm(card=32), codec=generator.codec, condition_provider=generator.condition_provider)


# -- melody (prepend) models ----------------------------------------------------------------------

def tiny_melody_generator(seed: int = 0) -> MusicGen:
    text = LUTConditioner(vocab=VOCAB, dim=8, output_dim=DIM)
    chroma = ChromaConditioner(output_dim=DIM, config=ChromaConfig(sample_rate=SR, n_fft=64, hop_length=16,
                                                                   duration=0.1))
    provider = ConditionProvider({"description": text, "self_wav": chroma})
    unit_scale(provider, seed + 1)
    return MusicGen(lm=tiny_lm(seed, cross_attention=False), codec=random_model(CODEC, seed=seed),
                    condition_provider=provider, fuser=ConditionFuser(FUSER_PRESETS["chroma2music"]),
                    config=WINDOW)


def test_melody_conditions_the_prefix_and_slides_with_the_window(monkeypatch):
    generator = tiny_melody_generator()
    t = torch.arange(SR // 4) / SR
    tone = torch.sin(2 * torch.pi * 110 * t)[None]
    conditions = generator.prepare_conditions(["happy"], melodies=[tone], guided=True)
    chroma_frames = generator.condition_provider.conditioners["self_wav"].config.chroma_length
    assert conditions.condition is None and conditions.prefix.shape[:2] == (2, chroma_frames + 1)
    with_melody = generator.generate("happy", 0.06, use_sampling=False, melody=(tone, SR), return_tokens=True)
    without = generator.generate("happy", 0.06, use_sampling=False, return_tokens=True)
    assert not torch.equal(with_melody.tokens, without.tokens)

    seen = []
    original = generator.prepare_conditions
    monkeypatch.setattr(generator, "prepare_conditions",
                        lambda texts, melodies=None, guided=True: seen.append(melodies) or original(
                            texts, melodies=melodies, guided=guided))
    ramp = torch.arange(100, dtype=torch.float32)[None] / 100  # 0.125 s of melody at 800 Hz
    generator.generate("happy", 0.23, seed=0, melody=(ramp, SR))
    assert len(seen) == 4  # one chroma per window
    for window, melodies in zip(plan_windows(46, 20, 12), seen):
        start = int(window.offset / FRAME_RATE * SR)
        positions = torch.arange(start, start + int(0.1 * SR)) % 100  # the window's stretch, wrapped
        assert torch.equal(melodies[0], ramp[..., positions])


# -- formats ----------------------------------------------------------------------------------------

def test_tokenwave_format_round_trip(generator, tmp_path):
    folder = generator.save_pretrained(tmp_path / "gen")
    assert detect_format(folder) == "tokenwave"
    loaded = MusicGen.from_pretrained(folder, device="cpu")
    assert loaded.config == generator.config and loaded.lm.config == generator.lm.config
    assert loaded.fuser.config == generator.fuser.config
    for key, value in generator.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    a = generator.generate(["happy rock", None], 0.23, seed=2, return_tokens=True)
    b = loaded.generate(["happy rock", None], 0.23, seed=2, return_tokens=True)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.wav, b.wav)
    with pytest.raises(FileExistsError, match="overwrite"):
        generator.save_pretrained(folder)
    generator.save_pretrained(folder, overwrite=True)


def test_tokenwave_format_with_t5_and_melody_round_trip(tiny_t5_folder, tmp_path):  # noqa: F811
    generator = build_tiny_generator(t5_folder=tiny_t5_folder, seed=4)
    folder = generator.save_pretrained(tmp_path / "gen_t5")
    assert (folder / "t5" / "spiece.model").is_file() and (folder / "codec" / "config.json").is_file()
    loaded = MusicGen.from_pretrained(folder, device="cpu")
    a = generator.generate(["calm piano melody at night", ""], 0.05, seed=1, return_tokens=True)
    b = loaded.generate(["calm piano melody at night", ""], 0.05, seed=1, return_tokens=True)
    assert torch.equal(a.tokens, b.tokens)

    # A fine-tuned T5 travels in t5/ with its new weights.
    text = T5Conditioner.from_pretrained(tiny_t5_folder, output_dim=DIM, finetune=True)
    with torch.no_grad():
        text.t5.shared.weight.mul_(1.5)
    tuned = MusicGen(lm=generator.lm, codec=generator.codec, condition_provider=ConditionProvider(
        {"description": text}), config=WINDOW)
    loaded = MusicGen.from_pretrained(tuned.save_pretrained(tmp_path / "gen_tuned"), device="cpu")
    reloaded = loaded.condition_provider.conditioners["description"]
    assert reloaded.finetune and torch.equal(reloaded.t5.shared.weight, text.t5.shared.weight)

    melody = tiny_melody_generator(seed=5)
    loaded = MusicGen.from_pretrained(melody.save_pretrained(tmp_path / "gen_melody"), device="cpu")
    assert loaded.condition_provider.conditioners["self_wav"].config == \
        melody.condition_provider.conditioners["self_wav"].config
    tone = torch.sin(torch.arange(200) / 3.0)[None]
    a = melody.generate("happy", 0.05, seed=1, melody=(tone, SR), return_tokens=True)
    b = loaded.generate("happy", 0.05, seed=1, melody=(tone, SR), return_tokens=True)
    assert torch.equal(a.tokens, b.tokens)


def test_load_onto_a_dtype(generator, tmp_path):
    folder = generator.save_pretrained(tmp_path / "gen")
    half = MusicGen.from_pretrained(folder, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in half.lm.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in half.codec.parameters()} == {torch.float32}
    for key, value in generator.lm.state_dict().items():
        assert torch.equal(half.lm.state_dict()[key], value.to(torch.bfloat16)), key
    out = half.generate("happy rock", 0.05, seed=0, return_tokens=True)
    assert out.wav.dtype == torch.float32 and out.tokens.shape == (1, K, 10)


AUDIOCRAFT_YAML = {
    "solver": "musicgen", "sample_rate": SR, "channels": 1,
    "compression_model_checkpoint": "//pretrained/facebook/tiny_codec",
    "dataset": {"segment_duration": 0.1, "batch_size": 1, "sample_on_weight": False},
    "lm_model": "transformer_lm",
    "codebooks_pattern": {"modeling": "delay", "delay": {"delays": [0, 1, 2, 3], "flatten_first": 0,
                                                         "empty_initial": 0},
                          "unroll": {"flattening": [0, 1, 2, 3], "delays": [0, 0, 0, 0]},
                          "music_lm": {"group_by": 2}, "coarse_first": {"delays": [0, 0, 0]}},
    "transformer_lm": {"dim": DIM, "num_heads": 4, "num_layers": 2, "hidden_scale": 2, "n_q": K, "card": CARD,
                       "dropout": 0.0, "emb_lr": None, "activation": "gelu", "norm_first": True, "bias_ff": False,
                       "bias_attn": False, "bias_proj": False, "past_context": None, "causal": True,
                       "custom": False, "memory_efficient": True, "attention_as_float32": False,
                       "layer_scale": None, "positional_embedding": "sin", "xpos": False, "checkpointing": "none",
                       "weight_init": "gaussian", "depthwise_init": "current", "zero_bias_init": True,
                       "norm": "layer_norm", "cross_attention": False, "qk_layer_norm": False,
                       "qk_layer_norm_cross": False, "attention_dropout": None, "kv_repeat": 1,
                       "two_step_cfg": False},
    "classifier_free_guidance": {"training_dropout": 0.3, "inference_coef": 3.0},
    "attribute_dropout": {},
    "fuser": {"cross_attention_pos_emb": False, "cross_attention_pos_emb_scale": 1, "sum": [], "prepend": [],
              "cross": ["description"], "input_interpolate": []},
    "conditioners": {"description": {"model": "t5", "t5": {"name": "t5-tiny", "finetune": False,
                                                           "word_dropout": 0.3, "normalize_text": False}}},
}


def write_audiocraft(folder, generator: MusicGen, cfg: dict, *, codec_pointer: str | None = None) -> None:
    """state_dict.bin and compression_state_dict.bin as audiocraft's export writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    state = dict(generator.lm.state_dict())
    for key, value in generator.condition_provider.state_dict().items():
        state["condition_provider." + key] = value
    torch.save({"best_state": state, "xp.cfg": yaml.safe_dump(cfg), "version": "1.3.0", "exported": True},
               folder / "state_dict.bin")
    if codec_pointer is None:
        save_model(generator.codec, folder / "compression_state_dict.bin", format="audiocraft")
    else:
        torch.save({"pretrained": codec_pointer}, folder / "compression_state_dict.bin")


@pytest.fixture()
def models_dir(tmp_path, monkeypatch, tiny_t5_folder):  # noqa: F811
    """$TOKENWAVE_MODELS with the tiny T5 under the name the YAML gives and the codec it points at."""
    import shutil

    root = tmp_path / "models"
    shutil.copytree(tiny_t5_folder, root / "t5-tiny")
    save_model(random_model(CODEC, seed=0), root / "tiny_codec", format="tokenwave")
    monkeypatch.setenv("TOKENWAVE_MODELS", str(root))
    return root


def test_audiocraft_format_loads_and_generates_like_ours(models_dir, tmp_path):
    ours = build_tiny_generator(t5_folder=models_dir / "t5-tiny", seed=6, codec_seed=0,  # the pointed-at codec
                                config=GeneratorConfig(max_duration=0.1, extend_stride=None))
    folder = tmp_path / "audiocraft"
    write_audiocraft(folder, ours, AUDIOCRAFT_YAML, codec_pointer="facebook/tiny_codec")
    assert detect_format(folder) == "audiocraft"
    loaded = MusicGen.from_pretrained(folder, device="cpu")
    assert loaded.config == GeneratorConfig(max_duration=0.1, extend_stride=None, mask_condition_padding=False)
    assert loaded.lm.config == dataclasses.replace(ours.lm.config, delays=(0, 1, 2, 3))
    text = loaded.condition_provider.conditioners["description"]
    assert isinstance(text, T5Conditioner) and text.empty_is_null and text.word_dropout == 0.3
    prompts = ["happy rock song with electric guitar and drums", "calm piano", ""]
    a = ours.generate(prompts, 0.08, seed=3, return_tokens=True)
    b = loaded.generate(prompts, 0.08, seed=3, return_tokens=True)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.wav, b.wav, atol=1e-6, rtol=0)
    # The state_dict.bin path itself works too, and an explicit T5 folder wins.
    loaded = MusicGen.from_pretrained(folder / "state_dict.bin", t5_path=models_dir / "t5-tiny",
                                      extend_stride=0.05)
    assert loaded.config.extend_stride == 0.05


def test_audiocraft_codec_file_and_audiogen_settings(models_dir, tmp_path):
    ours = build_tiny_generator(t5_folder=models_dir / "t5-tiny", seed=7, cls=AudioGen,
                                config=GeneratorConfig(max_duration=2.5, extend_stride=2.0))
    cfg = {**AUDIOCRAFT_YAML, "solver": "audiogen", "dataset": {"segment_duration": 2.5}}
    write_audiocraft(tmp_path / "audiogen", ours, cfg)
    loaded = AudioGen.from_pretrained(tmp_path / "audiogen", device="cpu")
    assert isinstance(loaded, AudioGen)
    assert loaded.config == GeneratorConfig(max_duration=2.5, extend_stride=2.0)  # AudioGen's 2 s stride
    a = ours.generate("calm night", 0.04, seed=0, return_tokens=True)
    b = loaded.generate("calm night", 0.04, seed=0, return_tokens=True)
    assert torch.equal(a.tokens, b.tokens)


def test_audiocraft_melody_checkpoint(models_dir, tmp_path):
    """chroma2music: T5 + chroma both prepended, ``${sample_rate}`` references resolved."""
    text = T5Conditioner.from_pretrained(models_dir / "t5-tiny", output_dim=DIM, empty_is_null=True)
    chroma = ChromaConditioner(output_dim=DIM, config=ChromaConfig(sample_rate=SR, n_fft=64, hop_length=16,
                                                                   argmax=True, duration=0.1))
    provider = ConditionProvider({"description": text, "self_wav": chroma})
    unit_scale(provider, 9)
    ours = MusicGen(lm=tiny_lm(9, cross_attention=False), codec=random_model(CODEC, seed=9),
                    condition_provider=provider, fuser=ConditionFuser(FUSER_PRESETS["chroma2music"]),
                    config=GeneratorConfig(max_duration=0.1, extend_stride=0.06))
    cfg = {**AUDIOCRAFT_YAML,
           "fuser": {**AUDIOCRAFT_YAML["fuser"], "prepend": ["self_wav", "description"], "cross": []},
           "conditioners": {
               "self_wav": {"model": "chroma_stem", "chroma_stem": {
                   "sample_rate": "${sample_rate}", "n_chroma": 12, "radix2_exp": 6, "argmax": True,
                   "match_len_on_eval": False, "eval_wavs": None, "n_eval_wavs": 100, "cache_path": None}},
               "description": {"model": "t5", "t5": {"name": "t5-tiny", "finetune": False, "word_dropout": 0.2,
                                                     "normalize_text": False}}}}
    write_audiocraft(tmp_path / "melody", ours, cfg)
    loaded = MusicGen.from_pretrained(tmp_path / "melody", device="cpu", extend_stride=0.06)
    assert loaded.has_melody and not loaded.lm.config.cross_attention
    assert loaded.condition_provider.conditioners["self_wav"].config == chroma.config
    assert loaded.fuser.config.prepend == ("self_wav", "description")
    tone = torch.sin(torch.arange(300) / 2.0)[None]
    a = ours.generate(["calm piano", "happy"], 0.23, seed=4, melody=([tone, None], SR), return_tokens=True)
    b = loaded.generate(["calm piano", "happy"], 0.23, seed=4, melody=([tone, None], SR), return_tokens=True)
    assert torch.equal(a.tokens, b.tokens)


def test_audiocraft_missing_t5_is_a_clear_error(models_dir, tmp_path, monkeypatch):
    ours = build_tiny_generator(t5_folder=models_dir / "t5-tiny", seed=6)
    cfg = {**AUDIOCRAFT_YAML, "conditioners": {"description": {"model": "t5", "t5": {"name": "t5-base"}}}}
    write_audiocraft(tmp_path / "ac", ours, cfg)
    with pytest.raises(registry.ModelNotFoundError, match="t5-base.*t5_path="):
        MusicGen.from_pretrained(tmp_path / "ac")
    (tmp_path / "ac" / "compression_state_dict.bin").unlink()
    with pytest.raises(ValueError, match="compression_state_dict.bin"):
        MusicGen.from_pretrained(tmp_path / "ac", t5_path=models_dir / "t5-tiny")


def test_registry_names_and_one_call_api(generator, models_dir, tmp_path):
    generator.save_pretrained(models_dir / "tiny-musicgen")
    assert registry.find_generator("facebook/tiny-musicgen") == models_dir / "tiny-musicgen"
    assert registry.find_generator("tiny_musicgen") == models_dir / "tiny-musicgen"
    with pytest.raises(registry.ModelNotFoundError, match="musicgen-small.*TOKENWAVE_MODELS"):
        registry.find_generator("musicgen-small")
    assert registry.find_t5("t5-tiny") == models_dir / "t5-tiny"
    direct = generator.generate("happy rock", 0.05, seed=5, return_tokens=True)
    via_api = api.generate("happy rock", 0.05, model="tiny-musicgen", device="cpu", seed=5, return_tokens=True)
    assert torch.equal(direct.tokens, via_api.tokens)
    assert api.load("tiny-musicgen", device="cpu") is api.load("tiny-musicgen", device="cpu")
    assert api.output_paths(tmp_path / "out.wav", 1) == [tmp_path / "out.wav"]
    assert api.output_paths(tmp_path / "out.wav", 2) == [tmp_path / "out_0.wav", tmp_path / "out_1.wav"]


def test_unknown_folder_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="expected a generator folder"):
        MusicGen.from_pretrained(tmp_path / "x")
