"""The trained tempo reader of the adherence bench (bench/tempo.py): it learns a corpus's beat
convention from onset periodicity, where the fixed autocorrelation estimator slips an octave."""
from __future__ import annotations

import pytest
import torch

from bench import tempo
from bench.analysis import ANALYSIS_RATE as RATE


def pulses(rate_bpm: float, seconds: float, *, seed: int) -> torch.Tensor:
    """Decaying noise bursts ``rate_bpm`` times a minute (every other one louder), with a little noise."""
    gen = torch.Generator().manual_seed(seed)
    wav = 0.001 * torch.randn(round(seconds * RATE), generator=gen)
    burst = torch.randn(600, generator=gen) * torch.exp(-torch.arange(600) / 100.0)
    period, index = 60.0 / rate_bpm, 0
    while (start := round(index * period * RATE)) + 600 < wav.shape[0]:
        wav[start:start + 600] += (0.4 if index % 2 == 0 else 0.25) * burst
        index += 1
    return wav


def eighths(bpm: float, seed: int) -> torch.Tensor:
    """A bar of eighth notes notated at ``bpm``: the pulse runs at twice the notated tempo."""
    return pulses(2 * bpm, 8.0, seed=seed)


def test_reader_learns_the_corpus_beat_convention_where_autocorrelation_slips_an_octave():
    gen = torch.Generator().manual_seed(0)
    train_bpm = (55 + 45 * torch.rand(40, generator=gen)).tolist()  # 55-100 bpm, pulses at 110-200
    reader = tempo.train_tempo_reader([eighths(b, i) for i, b in enumerate(train_bpm)], train_bpm,
                                      stretches=2, epochs=40)
    held_out = [58.0, 64.0, 71.0, 77.0, 83.0, 90.0, 96.0]
    clips = [eighths(b, 1000 + i) for i, b in enumerate(held_out)]
    read = tempo.tempo_report([reader.read(c) for c in clips], held_out)
    acf = tempo.tempo_report([tempo.estimate_tempo(c) for c in clips], held_out)
    assert read["within_8pct"] >= 6 / 7 and read["spearman"] > 0.9
    assert acf["within_8pct"] <= 3 / 7  # it reads the pulse: double the notated tempo
    assert acf["octave_errors"] >= 4 / 7


def test_stretching_the_onsets_moves_the_periodicity_like_a_faster_tempo():
    onsets = tempo.band_onsets(pulses(100, 8.0, seed=0))
    assert onsets.shape[0] == len(tempo.BAND_GROUPS)
    faster = tempo.stretch(onsets, 1.25)
    assert faster.shape[-1] == round(onsets.shape[-1] / 1.25)
    assert tempo.stretch(onsets, 1.0) is onsets
    grid = tempo.FEATURE_GRID
    in_range = (grid > 80) & (grid < 200)  # the pulse, not its multiples or fractions

    def peak(features: torch.Tensor) -> float:
        everything = features.view(len(tempo.BAND_GROUPS), -1)[-1]
        return float(grid[in_range][everything[in_range].argmax()])

    assert peak(tempo.periodicity_features(onsets)) == pytest.approx(100, rel=0.04)
    assert peak(tempo.periodicity_features(faster)) == pytest.approx(125, rel=0.04)
    real = tempo.periodicity_features(tempo.band_onsets(pulses(125, 8.0, seed=1)))
    assert peak(real) == pytest.approx(125, rel=0.04)


def test_reader_refuses_what_it_cannot_learn_or_read():
    with pytest.raises(ValueError, match="one tempo per clip"):
        tempo.train_tempo_reader([pulses(100, 4.0, seed=0)], [100, 120])
    with pytest.raises(ValueError, match="tempi must lie in 40-240 bpm"):
        tempo.train_tempo_reader([pulses(100, 4.0, seed=0)], [300])
    reader = tempo.TempoReader()
    with pytest.raises(ValueError, match="too short"):
        reader.read(torch.zeros(RATE // 100))
    bpm = reader.read(pulses(100, 4.0, seed=0))  # untrained: some tempo inside the range it answers
    assert tempo.READ_BPM[0] <= bpm <= tempo.READ_BPM[1]


def test_sweep_reference_reads_the_sweeps_spearman_on_real_clips():
    """Exact reads of clips at the prompted tempi give the most a sweep's Spearman can be in every draw;
    octave slips at the slow tempo pull the draws down and spread them; too few clips near a tempo: none."""
    tempos = (70, 100, 140)
    truths = [68.0, 70.0, 72.0, 99.0, 101.0, 138.0, 142.0, 120.0]  # 120: near none of them
    exact = tempo.sweep_reference(truths, truths, tempos, per_tempo=4, draws=200)
    assert exact["clips"] == {70: 3, 100: 2, 140: 2}
    assert exact["within_8pct"] == {70: 1.0, 100: 1.0, 140: 1.0}
    assert exact["spearman"]["p10"] > 0.85 and exact["spearman"]["at_least_target"] == 1.0
    assert exact["spearman"]["p90"] <= 1.0 and exact["spearman_all"] > 0.9
    slipped = [140.0 if t == 68.0 else t for t in truths]  # one of the three 70 bpm clips read double
    noisy = tempo.sweep_reference(slipped, truths, tempos, per_tempo=4, draws=200)
    assert noisy["within_8pct"][70] == pytest.approx(2 / 3)
    assert noisy["spearman"]["p10"] < exact["spearman"]["p10"] - 0.2
    assert 0 < noisy["spearman"]["at_least_target"] < 1
    again = tempo.sweep_reference(slipped, truths, tempos, per_tempo=4, draws=200)
    assert again == noisy  # seeded
    assert tempo.sweep_reference(truths, truths, (70, 100, 160), per_tempo=4)["spearman"] is None
    with pytest.raises(ValueError, match="per_tempo"):
        tempo.sweep_reference(truths, truths, tempos, per_tempo=0)
    with pytest.raises(ValueError, match="as many"):
        tempo.sweep_reference(truths[:-1], truths, tempos, per_tempo=2)
