"""bench/quality.py and bench/adherence.py: Opus alignment, codec scoring, and the adherence measures.

Synthetic audio only: sines and clicks for Opus and tempo, triads for the mode, two timbres for
the classifier, and a tiny synthetic corpus (sidecars written as the corpus recipe writes them)
with a stand-in "generator" that plays what its prompt asks, for the whole adherence run.
Opus tests skip when opuslib or libopus is missing (``pip install opuslib``, ``apt-get install
libopus0``).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import pytest
import soundfile as sf
import torch

from bench import adherence, quality, tempo
from bench.analysis import NUM_MELS
from codec import audio as audio_io
from codec.model import PRESETS
from codec.training.buzz import buzz_db
from codec.training.losses import MelDistance, si_snr
from inference.cli import random_model

needs_opus = pytest.mark.skipif(not quality.opus_available(), reason="opuslib or libopus is not installed")
RATE = adherence.ANALYSIS_RATE


def tones(freqs: list[float], seconds: float, sample_rate: int, amplitude: float = 0.2) -> torch.Tensor:
    t = torch.arange(round(seconds * sample_rate), dtype=torch.float64) / sample_rate
    return sum(amplitude * torch.sin(2 * math.pi * f * t) for f in freqs).float()


def click_track(bpm: float, seconds: float, *, accent_every: int = 0, seed: int = 0) -> torch.Tensor:
    """Decaying noise bursts on every beat at :data:`RATE`; with ``accent_every`` the first beat of
    each group is twice as loud (a bar accent, which tempts autocorrelation to the bar)."""
    gen = torch.Generator().manual_seed(seed)
    wav = 0.001 * torch.randn(round(seconds * RATE), generator=gen)
    burst = torch.randn(800, generator=gen) * torch.exp(-torch.arange(800) / 120.0)
    beat, index = 60.0 / bpm, 0
    while (start := round(index * beat * RATE)) + 800 < wav.shape[0]:
        gain = 2.0 if accent_every and index % accent_every == 0 else 1.0
        wav[start:start + 800] += 0.3 * gain * burst
        index += 1
    return wav


# -- Opus ---------------------------------------------------------------------------------------
@needs_opus
@pytest.mark.parametrize("sample_rate", [32_000, 16_000])
def test_opus_roundtrip_is_aligned_to_the_sample(sample_rate):
    """At a high bitrate the decoded sines match the input in phase: SI-SNR is high at lag 0 and
    drops for a lag of one sample either way (a leftover lookahead would put the peak elsewhere)."""
    wav = tones([440.0, 1234.5, 3000.0], 0.6, sample_rate)[None]
    decoded, measured, band = quality.opus_roundtrip(wav, sample_rate, kbps=128)
    assert decoded.shape == wav.shape
    assert measured == pytest.approx(128, rel=0.01) and band == "FB"

    def score(lag: int) -> float:
        return float(si_snr(torch.roll(decoded, lag, dims=-1)[None], wav[None]))

    at_zero = score(0)
    assert at_zero > 25
    assert all(score(lag) < at_zero - 1 for lag in (-2, -1, 1, 2))


@needs_opus
def test_opus_stereo_keeps_channels_apart_and_a_low_rate_costs_quality():
    wav = torch.stack([tones([440.0], 0.5, 32_000), tones([1000.0], 0.5, 32_000)])
    decoded, _, _ = quality.opus_roundtrip(wav, 32_000, kbps=96)
    assert decoded.shape == wav.shape
    assert float(si_snr(decoded[None, :1], wav[None, :1])) > 15
    assert float(si_snr(decoded[None, 1:], wav[None, 1:])) > 15
    low, measured, _ = quality.opus_roundtrip(wav[:1], 32_000, kbps=6)
    assert measured == pytest.approx(6, rel=0.01)
    assert float(si_snr(low[None], wav[None, :1])) < float(si_snr(decoded[None, :1], wav[None, :1]))


def test_opus_refuses_bad_arguments():
    with pytest.raises(ValueError, match="1 or 2 channels"):
        quality.opus_roundtrip(torch.zeros(3, 100), 32_000, kbps=6)
    with pytest.raises(ValueError, match="frames are"):
        quality.opus_roundtrip(torch.zeros(1, 100), 32_000, kbps=6, frame_ms=7)
    with pytest.raises(ValueError, match="bitrates"):
        quality.opus_roundtrip(torch.zeros(1, 100), 32_000, kbps=0.1)


# -- codec quality ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_codec():
    return random_model(replace(PRESETS["encodec_32khz"], name="tiny32", n_filters=2, dimension=8, lstm=0))


ROW_KEYS = {"system", "kbps", "measured_kbps", "mel_distance", "si_snr", "buzz_db", "visqol", "visqol_clips", "clips",
            "per_clip"}


def test_codec_quality_end_to_end_on_a_tiny_codec(tiny_codec):
    """Two clips at 16 kHz are scored at the codec's 32 kHz; each codec row holds the metrics of
    the codec's own round trip, and Opus rows (when libopus is here) run at 6 kbps and at the
    codec's bitrate."""
    noise = 0.1 * torch.randn(1, 8000, generator=torch.Generator().manual_seed(1))
    clips = [tones([330.0, 990.0], 0.5, 16_000)[None], noise]
    rows = quality.codec_quality(clips, 16_000, model=tiny_codec, codebooks=[1, 4], visqol_clips=0)
    names = [row["system"] for row in rows]
    assert names[:2] == ["tiny32 (1 codebook)", "tiny32 (4 codebooks)"]
    assert rows[1]["kbps"] == pytest.approx(4 * tiny_codec.bandwidth_per_codebook)
    for row in rows:
        assert set(row) == ROW_KEYS and row["clips"] == 2 and len(row["per_clip"]) == 2 and row["visqol"] is None
    if quality.opus_available():
        assert [row["kbps"] for row in rows[2:]] == sorted([6.0, round(4 * tiny_codec.bandwidth_per_codebook, 3)])
    else:
        assert len(rows) == 2

    reference = audio_io.convert_audio(clips[0], 16_000, 32_000, 1)
    with torch.inference_mode():
        decoded = tiny_codec.decode(tiny_codec.encode(reference[None], num_codebooks=4))[..., : reference.shape[-1]]
    assert rows[1]["per_clip"][0]["si_snr"] == pytest.approx(float(si_snr(decoded, reference[None])), abs=1e-4)
    assert rows[1]["per_clip"][0]["mel_distance"] == pytest.approx(float(MelDistance(32_000)(decoded, reference[None])),
                                                                   abs=1e-5)
    assert rows[1]["per_clip"][0]["buzz_db"] == pytest.approx(
        buzz_db(reference, decoded[0], 32_000, tiny_codec.frame_rate), abs=1e-4)
    assert "| tiny32 (4 codebooks) | 2.20 |" in quality.quality_table(rows)
    assert "frame-rate buzz (dB)" in quality.quality_table(rows)
    only = quality.codec_quality(clips, 16_000, model=tiny_codec, codebooks=[4], with_opus=False)
    assert [row["system"] for row in only] == ["tiny32 (4 codebooks)"]


def test_default_codebooks_are_the_trained_bandwidths_and_all(tiny_codec):
    assert quality.default_codebooks(tiny_codec) == [4]  # encodec_32khz trains at 2.2 kbps = 4 codebooks
    config = replace(PRESETS["encodec_24khz"], n_filters=2, dimension=8, lstm=0)
    assert quality.default_codebooks(random_model(config)) == [2, 4, 8, 16, 32]


def test_scorer_gives_identical_audio_a_perfect_score():
    wav = tones([440.0], 0.5, 32_000)[None]
    scores = quality.Scorer(32_000)(wav, wav.clone())
    assert scores["mel_distance"] == 0 and scores["si_snr"] > 60


# -- tempo ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bpm", [70, 100, 140, 175])
def test_tempo_of_a_click_track(bpm):
    assert tempo.estimate_tempo(click_track(bpm, 8.0)) == pytest.approx(bpm, rel=0.02)


def test_tempo_resists_the_bar_accent():
    """A loud first beat of every 4 makes the bar period a strong autocorrelation peak too."""
    assert tempo.estimate_tempo(click_track(96, 8.0, accent_every=4)) == pytest.approx(96, rel=0.02)


def test_tempo_error_kinds_and_bad_ranges():
    assert tempo.tempo_error_kind(103, 100) == "exact"
    assert tempo.tempo_error_kind(51, 100) == "octave"
    assert tempo.tempo_error_kind(190, 95) == "octave"
    assert tempo.tempo_error_kind(130, 100) == "wrong"
    with pytest.raises(ValueError, match="min_bpm"):
        tempo.estimate_tempo(click_track(100, 2.0), min_bpm=200, max_bpm=100)
    with pytest.raises(ValueError, match="too short"):
        tempo.estimate_tempo(torch.zeros(RATE // 4))


def test_spearman_with_ties():
    assert adherence.spearman([1, 2, 3], [10, 30, 20]) == pytest.approx(0.5)
    assert adherence.spearman([70, 70, 140, 140], [71, 69, 150, 139]) == pytest.approx(0.894427, rel=1e-5)
    assert math.isnan(adherence.spearman([1, 1], [1, 2]))


# -- mode ---------------------------------------------------------------------------------------
NOTE = {name: i for i, name in enumerate(adherence.PITCH_CLASSES)}


def triad(tonic: int, mode: str, seconds: float = 2.0) -> torch.Tensor:
    third = 4 if mode == "major" else 3
    return tones([261.63 * 2 ** ((tonic + step) / 12) for step in (0, third, 7)], seconds, RATE)


@pytest.mark.parametrize("tonic", [0, 7, 9])
@pytest.mark.parametrize("mode", ["major", "minor"])
def test_mode_of_a_triad_on_a_known_tonic(tonic, mode):
    assert adherence.estimate_mode(triad(tonic, mode), tonic) == mode
    assert adherence.estimate_key(triad(tonic, mode)) == (tonic, mode)
    with pytest.raises(ValueError, match="pitch class"):
        adherence.estimate_mode(triad(tonic, mode), 12)


# -- the classifier -----------------------------------------------------------------------------
def toy_clip(label: int, gen: torch.Generator) -> torch.Tensor:
    """Class 0: a dull tone (fundamental only) in 150-400 Hz; class 1: a bright tone (8 harmonics)
    in the same range; both with noise and random loudness, 2.5 s."""
    f0 = 150 + 250 * float(torch.rand((), generator=gen))
    harmonics = [f0] if label == 0 else [f0 * k for k in range(1, 9)]
    gain = 0.05 + 0.3 * float(torch.rand((), generator=gen))
    return gain * tones(harmonics, 2.5, RATE, amplitude=1 / len(harmonics)) + 0.01 * torch.randn(
        round(2.5 * RATE), generator=gen)


def test_classifier_beats_chance_on_a_two_class_toy_set():
    gen = torch.Generator().manual_seed(0)
    labels = [i % 2 for i in range(24)]
    features = [adherence.timbre_features(toy_clip(y, gen)) for y in labels]
    classifier = adherence.train_classifier(features[:16], labels[:16], 2, steps=150)
    predicted = classifier.predict(features[16:])
    assert sum(p == y for p, y in zip(predicted, labels[16:])) >= 7  # chance: 4 of 8
    with pytest.raises(ValueError, match="labels must lie"):
        adherence.train_classifier(features[:2], [0, 2], 2)


def test_timbre_shift_names_the_feature_that_moved():
    """Clips like the reference sit near 0; the same tones gated on and off every other frame
    move the frame-to-frame change part by several standard deviations, the band means less."""
    gen = torch.Generator().manual_seed(0)
    labels = [i % 2 for i in range(16)]
    clips = [toy_clip(y, gen) for y in labels]
    names = ["dull", "bright"]
    features = [adherence.timbre_features(c) for c in clips]
    reference = adherence.family_reference(features, [names[y] for y in labels])
    assert set(reference) == {"dull", "bright"} and reference["dull"][0].shape == (3 * NUM_MELS,)
    same = adherence.timbre_shift(features, [names[y] for y in labels], reference)
    assert same["clips"] == 16 and all(abs(same[part]) < 1e-4 for part in adherence.TIMBRE_PARTS)
    gate = (torch.arange(clips[0].shape[-1]) // 320 % 2).float()  # 20 ms on, 20 ms off
    flicker = [adherence.timbre_features(c * gate) for c in clips]
    moved = adherence.timbre_shift(flicker, [names[y] for y in labels], reference)
    assert moved["change"] > 2 and moved["change"] > abs(moved["spread"])
    assert set(moved["change_per_family"]) == {"dull", "bright"}
    assert adherence.timbre_shift(features[:2], ["organ", "organ"], reference) is None  # no such family


# -- a synthetic corpus and a generator that follows its prompt -----------------------------------
FAMILIES = {"keys": ("piano", 1), "brass": ("trumpet", 8)}  # family: (caption name, harmonics)


def song(family: str, bpm: float, tonic: int, mode: str, seconds: float, seed: int) -> torch.Tensor:
    """Clicks on every beat plus a sustained tonic triad in the family's timbre."""
    harmonics = FAMILIES[family][1]
    third = 4 if mode == "major" else 3
    pitches = [220.0 * 2 ** ((tonic - 9 + step) / 12) for step in (0, third, 7, 12)]
    chord = tones([p * k for p in pitches for k in range(1, harmonics + 1)], seconds, RATE,
                  amplitude=0.15 / harmonics)
    return chord + click_track(bpm, seconds, seed=seed)


def write_corpus(folder, count: int, seed: int, seconds: float = 4.0) -> None:
    folder.mkdir(parents=True)
    for i in range(count):
        family = list(FAMILIES)[i % 2]
        bpm, tonic, mode = 70 + (i * 17) % 80, (i * 5) % 12, ("major", "minor")[(i // 2) % 2]
        sf.write(folder / f"{i:06d}.wav", song(family, bpm, tonic, mode, seconds, seed + i).numpy(), RATE)
        facts = {"featured": {"family": family, "name": FAMILIES[family][0]}, "tempo": bpm,
                 "tempo_word": "slow" if bpm < 76 else "moderate" if bpm < 100 else "upbeat",
                 "tonic": tonic, "mode": mode}
        caption = f"a tune led by {FAMILIES[family][0]}"
        (folder / f"{i:06d}.json").write_text(json.dumps({"description": caption, "tokenwave_corpus": facts}))
    (folder / "999999.json").write_text("{}")  # no .wav: a clip still being rendered, not read


def follow_prompt(texts: list[str], seed: int) -> tuple[torch.Tensor, int]:
    """A stand-in generator: plays the family, tempo and key its prompt names (stereo, 32 kHz)."""
    out = []
    for i, text in enumerate(texts):
        name = re.search(r"led by (\w+);", text).group(1)
        family = next(f for f, (caption, _) in FAMILIES.items() if caption == name)
        bpm = int(re.search(r"at (\d+) bpm", text).group(1))
        tonic_name, mode = re.search(r"in ([A-G]#?) (major|minor)", text).groups()
        wav = song(family, bpm, NOTE[tonic_name], mode, 4.0, seed * 100 + i)
        out.append(audio_io.resample(wav, RATE, 32_000).expand(2, -1))
    return torch.stack(out), 32_000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root / "train", 12, seed=0)
    write_corpus(root / "valid", 4, seed=100)
    return root


def test_read_corpus_and_vocabulary(corpus):
    clips = adherence.read_corpus(corpus / "train")
    assert len(clips) == 12 and clips[0].family == "keys" and clips[1].instrument == "trumpet"
    vocabulary = adherence.Vocabulary.from_corpus(clips)
    assert vocabulary.instruments == {"brass": "trumpet", "keys": "piano"}
    assert vocabulary.tempo_word(72) == "slow" and vocabulary.tempo_word(120) == "upbeat"
    assert len(adherence.read_corpus(corpus / "train", limit=3)) == 3
    with pytest.raises(FileNotFoundError, match="does not exist"):
        adherence.read_corpus(corpus / "missing")
    bad = corpus / "bad"
    bad.mkdir()
    (bad / "000000.wav").write_bytes(b"")
    (bad / "000000.json").write_text(json.dumps({"tokenwave_corpus": {"tempo": 100}}))
    with pytest.raises(ValueError, match="000000.json"):
        adherence.read_corpus(bad)


def test_prompts_vary_one_attribute_at_a_time(corpus):
    vocabulary = adherence.Vocabulary.from_corpus(adherence.read_corpus(corpus / "train"))
    prompts = adherence.build_prompts(vocabulary, families=["keys", "brass"], base_family="keys",
                                      tempos=(70, 140), tonic=7)
    base = adherence.prompt_text(vocabulary, "keys", 100, 7, "major")
    assert [p.attribute for p in prompts] == ["family"] * 2 + ["tempo"] * 2 + ["mode"] * 2
    for p in prompts:
        fields = {"family": p.family != "keys", "tempo": p.tempo != 100, "mode": p.mode != "major"}
        assert not any(changed for name, changed in fields.items() if name != p.attribute)
        assert p.text == adherence.prompt_text(vocabulary, p.family, p.tempo, p.tonic, p.mode)
    # "moderate": the word of the corpus clip nearest 100 bpm (97)
    assert prompts[0].text == base == "instrumental tune led by piano; moderate, at 100 bpm, in G major"
    assert "led by trumpet" in prompts[1].text and "slow, at 70 bpm" in prompts[2].text
    assert prompts[5].text.endswith("in G minor")
    with pytest.raises(ValueError, match="voice"):
        adherence.build_prompts(vocabulary, families=["voice"], base_family="keys")


def test_adherence_run_end_to_end(corpus):
    """Measures validate on the synthetic corpus, and a generator that plays what it is asked
    scores full marks on all three sweeps; one that ignores the prompt does not."""
    settings = adherence.AdherenceSettings(min_family_clips=2, per_prompt=2, batch=5)
    result = adherence.run_adherence(corpus / "train", corpus / "valid", follow_prompt, settings, log=lambda _: None)
    assert result["families"] == ["brass", "keys"]
    assert result["classifier"]["accuracy"] == 1.0
    assert result["tempo"]["valid"]["within_8pct"] == 1.0
    assert result["key"]["valid"]["mode_given_tonic"] == 1.0
    generated = result["generated"]
    assert generated["family"]["accuracy"] == 1.0 and generated["family"]["clips"] == 4
    # the most rank correlation possible with each prompted tempo twice (tied) and distinct estimates
    best = adherence.spearman([70, 70, 100, 100, 140, 140], range(6))
    assert generated["tempo"]["spearman"] == pytest.approx(best)
    assert generated["tempo"]["per_tempo"][140]["median_bpm"] == pytest.approx(140, rel=0.02)
    assert generated["mode"]["accuracy"] == 1.0 and generated["mode"]["trusted"]
    tables = adherence.adherence_tables(result)
    assert "| valid | 4 | 100 % |" in tables and "**0.96**" in tables
    # the sweep's Spearman on real clips: the held-out clips near each prompted tempo (none near 70 here)
    reference = result["tempo_sweep_reference"]["valid"]
    assert reference["per_tempo"] == 2 and sum(reference["clips"].values()) <= 4
    assert "The tempo sweep's Spearman on real music" in tables
    # what the classifier reads: held-out clips near their family's train clips; the generations' shift reported
    assert result["timbre_shift"]["valid"]["clips"] == 4 and abs(result["timbre_shift"]["valid"]["change"]) < 2
    assert generated["family_timbre_shift"]["clips"] == 4 and "| generated | 4 |" in tables

    def ignore_prompt(texts, seed):
        wav = torch.stack([song("keys", 100, 0, "major", 4.0, seed * 100 + i) for i in range(len(texts))])
        return wav[:, None], RATE

    deaf = adherence.run_adherence(corpus / "train", corpus / "valid", ignore_prompt, settings, log=lambda _: None)
    assert deaf["generated"]["family"]["accuracy"] == 0.5
    assert deaf["generated"]["family"]["confusion"] == {"brass": {"keys": 2}, "keys": {"keys": 2}}
    assert generated["family"]["confusion"] == {"brass": {"brass": 2}, "keys": {"keys": 2}}
    medians = [t["median_bpm"] for t in deaf["generated"]["tempo"]["per_tempo"].values()]
    assert medians == pytest.approx([100] * 3, rel=0.02)

    # Frame-rate buzz: a pattern repeating every 20 ms raises the lines at multiples of 50 Hz.
    assert abs(generated["lines"]["buzz_db"]) < 1.5 and "Frame-rate buzz" in tables

    def buzzing(texts, seed):
        wav, rate = follow_prompt(texts, seed)
        pattern = 0.05 * torch.randn(rate // 50, generator=torch.Generator().manual_seed(3))
        return wav + pattern.repeat(wav.shape[-1] // len(pattern) + 1)[: wav.shape[-1]], rate

    buzzed = adherence.run_adherence(corpus / "train", corpus / "valid", buzzing, settings, log=lambda _: None)
    assert buzzed["generated"]["lines"]["buzz_db"] > generated["lines"]["buzz_db"] + 3


def test_measures_through_a_codec_round_trip(corpus, tiny_codec):
    """roundtrip: the measures also read the held-out clips passed through it; an exact one
    scores as the clips themselves, one that destroys timbre and pitch scores lower."""
    settings = adherence.AdherenceSettings(min_family_clips=2)

    def exact(wav, rate):
        return adherence.as_analysis_audio(wav, rate)

    result = adherence.run_adherence(corpus / "train", corpus / "valid", None, settings, log=lambda _: None,
                                     roundtrip=exact)
    coded = result["roundtrip"]
    assert coded["classifier"]["accuracy"] == result["classifier"]["accuracy"] == 1.0
    assert coded["tempo"] == result["tempo"]["valid"] and coded["key"] == result["key"]["valid"]
    assert coded["lines_db"] == pytest.approx(result["lines_db"]["valid"])
    references = result["tempo_sweep_reference"]
    assert references["valid, codec round trip"] == references["valid"]
    assert "| valid, codec round trip | 4 | 100 % |" in adherence.adherence_tables(result)
    assert result["timbre_shift"]["valid, codec round trip"] == result["timbre_shift"]["valid"]
    assert "codec_classifier" not in coded
    # the trained tempo reader is the measure; the autocorrelation estimator is reported beside it,
    # and alone with tempo_reader=False
    assert coded["tempo_acf"] == result["tempo_acf"]["valid"]
    assert "| trained reader | valid | 4 |" in adherence.adherence_tables(result)
    plain = adherence.run_adherence(corpus / "train", corpus / "valid", None, replace(settings, tempo_reader=False),
                                    log=lambda _: None, roundtrip=exact)
    assert "tempo_acf" not in plain and plain["tempo"] == result["tempo_acf"]
    assert "| autocorrelation | valid | 4 |" in adherence.adherence_tables(plain)

    # a classifier trained on round trips reads the generations too (here the exact round trip: the same)
    both = adherence.run_adherence(corpus / "train", corpus / "valid", follow_prompt,
                                   replace(settings, codec_classifier=True, per_prompt=2, batch=5),
                                   log=lambda _: None, roundtrip=exact)
    assert both["roundtrip"]["codec_classifier"]["accuracy"] == 1.0
    assert both["generated"]["family_codec"]["accuracy"] == both["generated"]["family"]["accuracy"] == 1.0
    assert "Through the codec: **100 %**" in adherence.adherence_tables(both)

    def noise(wav, rate):
        seconds = wav.shape[-1] / rate
        return 0.3 * torch.randn(int(seconds * RATE), generator=torch.Generator().manual_seed(0))

    ruined = adherence.run_adherence(corpus / "train", corpus / "valid", None, settings, log=lambda _: None,
                                     roundtrip=noise)["roundtrip"]
    assert ruined["key"]["mode_given_tonic"] < 1.0 or ruined["classifier"]["accuracy"] < 1.0
    assert ruined["tempo"]["within_8pct"] < 1.0

    # quality's round trip through a real (tiny, random) codec: mono analysis audio of the clip's length
    roundtrip = quality.codec_roundtrip(tiny_codec)
    wav = torch.randn(2, 24_000) * 0.1
    out = roundtrip(wav, 48_000)
    assert out.dim() == 1 and abs(out.shape[0] - RATE // 2) <= 2 and torch.isfinite(out).all()


def test_generate_clips_from_a_tiny_musicgen_is_seeded():
    """The MusicGen adapter: batches of prompts in, one mono 16 kHz clip per prompt out, the same
    clips for the same seed."""
    from codec.model import EncodecConfig
    from conditioning import ConditionProvider, LUTConditioner
    from inference.generator import GeneratorConfig, MusicGen
    from lm import LMConfig, LMModel

    torch.manual_seed(0)
    codec = random_model(EncodecConfig(name="tiny800", sample_rate=800, channels=1, causal=False, ratios=(2, 2),
                                       n_filters=4, dimension=8, num_codebooks=2, codebook_size=16, lstm=0,
                                       true_skip=True, target_bandwidths=(1.6,)))
    lm = LMModel(LMConfig(dim=16, num_heads=2, num_layers=1, ffn_dim=32, num_codebooks=2, card=16)).eval()
    text = LUTConditioner(vocab=["piano", "trumpet", "slow"], dim=4, output_dim=16)
    generator = MusicGen(lm=lm, codec=codec, condition_provider=ConditionProvider({"description": text}),
                         config=GeneratorConfig(max_duration=0.2, extend_stride=0.1))
    generate = adherence.musicgen_generate_fn(generator, 0.05, cfg_coef=2.0)
    texts = ["piano", "trumpet slow", "slow"]
    clips = adherence.generate_clips(generate, texts, batch=2, seed=3)
    assert [c.shape for c in clips] == [torch.Size([round(0.05 * RATE)])] * 3
    again = adherence.generate_clips(generate, texts, batch=2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(clips, again))
    with pytest.raises(ValueError, match="expected \\(1, C, T\\)"):
        adherence.generate_clips(lambda t, s: (torch.zeros(2, 1, 10), 800), ["x"], batch=1, seed=0)


def test_cli_runs_and_reports_errors(corpus, tmp_path, capsys):
    out = tmp_path / "q.json"
    code = quality.main(["--data", str(corpus / "valid"), "--clips", "2", "--visqol-clips", "0",
                         "--min-family-clips", "2", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "## Codec quality" in printed and "## Text adherence" in printed
    report = json.loads(out.read_text())
    assert report["codec_quality"]["clips"] == ["000000.wav", "000001.wav"]
    assert report["adherence"]["families"] == ["brass", "keys"]
    assert quality.main(["--data", str(tmp_path / "nowhere"), "--no-adherence"]) == 1
    assert "no such folder" in capsys.readouterr().err
