"""Codec training: losses, MS-STFT discriminator (against the reference), balancer math, data,
the trainer (loss goes down, exact resume, atomic checkpoints), entropy-LM training, and the
``train-codec`` CLI end to end on a tiny codec and a synthesized corpus."""
from __future__ import annotations

import math
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from codec import audio, ecdc
from codec.entropy_lm import EntropyLM
from codec.files import CheckpointError
from codec.formats import load_model
from codec.model import PRESETS, EncodecModel
from codec.training import (Balancer, CheckpointManager, CodecTrainConfig, CodecTrainer,
                            EntropyLMTrainConfig, EntropyLMTrainer, MelDistance,
                            MultiScaleMelLoss, MultiScaleSTFTDiscriminator, RandomClips,
                            StepBatchSampler, build_codec, codebook_choices,
                            feature_matching_loss, hinge_discriminator_loss,
                            hinge_generator_loss, load_codec_for_training, mel_filterbank,
                            scan_audio_folder, si_snr)
from codec.training.entropy_trainer import codec_codes
from codec.training.validate import visqol_score
from inference import cli

SR = 24_000
TINY = replace(PRESETS["encodec_24khz"], name="tiny", n_filters=4, dimension=8,
               num_codebooks=4, codebook_size=16, lstm=0)
SEGMENT = 0.1  # seconds: 2400 samples, 8 frames
# Small discriminator and mel scales keep a step at a few tens of milliseconds.
FAST = CodecTrainConfig(steps=6, batch_size=2, segment_seconds=SEGMENT, disc_filters=4,
                        disc_windows=(256, 128, 64), mel_scales=(5, 6, 7, 8), log_every=2,
                        valid_every=3, valid_clips=2, checkpoint_every=2, keep_last=2,
                        num_workers=0)


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """Three short clips (one stereo at 16 kHz, one shorter than a training clip) and a file
    that is not audio."""
    root = tmp_path_factory.mktemp("corpus")
    gen = torch.Generator().manual_seed(0)
    t = torch.arange(int(0.6 * SR)) / SR
    tone = 0.3 * torch.sin(2 * math.pi * 220 * t) + 0.1 * torch.sin(2 * math.pi * 1760 * t)
    audio.write_audio(root / "tone.wav", tone[None], SR, subtype="FLOAT")
    t16 = torch.arange(int(0.4 * 16_000)) / 16_000
    chirp = 0.3 * torch.sin(2 * math.pi * (300 + 2000 * t16) * t16)
    stereo = torch.stack([chirp, 0.05 * torch.randn(len(t16), generator=gen)])
    (root / "sub").mkdir()
    audio.write_audio(root / "sub" / "stereo16k.flac", stereo, 16_000, subtype="PCM_24")
    audio.write_audio(root / "short.wav", 0.2 * torch.randn(1, 1000, generator=gen), SR,
                      subtype="FLOAT")
    (root / "broken.wav").write_bytes(b"RIFF not really a wave file")
    return root


def clips(corpus_dir: Path, seed: int = 0, seconds: float = SEGMENT) -> RandomClips:
    files = scan_audio_folder(corpus_dir).files
    return RandomClips(files, sample_rate=SR, channels=1, segment_samples=round(seconds * SR),
                       seed=seed)


# -- losses --------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values")
@pytest.mark.parametrize("n_fft, num_mels, f_min, f_max", [(1024, 64, 0.0, None),
                                                            (64, 64, 0.0, None),
                                                            (512, 40, 64.0, 8000.0)])
def test_mel_filterbank_matches_transformers(n_fft, num_mels, f_min, f_max):
    from transformers.audio_utils import mel_filter_bank

    ours = mel_filterbank(num_freqs=n_fft // 2 + 1, num_mels=num_mels, sample_rate=SR,
                          f_min=f_min, f_max=f_max)
    theirs = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=num_mels,
                             min_frequency=f_min, max_frequency=f_max or SR / 2,
                             sampling_rate=SR, norm=None, mel_scale="htk")
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-6)


def test_mel_loss_and_distance():
    gen = torch.Generator().manual_seed(0)
    x = 0.3 * torch.randn(2, 1, 4000, generator=gen)
    loss = MultiScaleMelLoss(sample_rate=SR)  # the paper's scales 32..2048
    assert loss(x, x.clone()).item() == 0.0
    y = (x + 0.05 * torch.randn(x.shape, generator=gen)).requires_grad_()
    value = loss(y, x)
    assert value.item() > 0
    value.backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    # more noise, more loss; a short input (shorter than the largest window) still works
    assert loss(x + 0.2 * torch.randn(x.shape, generator=gen), x) > value
    assert loss(x[..., :300] * 0.5, x[..., :300]).item() > 0
    distance = MelDistance(SR)
    assert torch.equal(distance(x, x), torch.zeros(2))
    assert (distance(y.detach(), x) > 0).all()
    with pytest.raises(ValueError, match="same shape"):
        loss(x, x[..., :100])


def test_si_snr():
    gen = torch.Generator().manual_seed(0)
    t = torch.arange(8000) / SR
    ref = torch.sin(2 * math.pi * 440 * t).view(1, 1, -1).repeat(2, 1, 1)
    assert (si_snr(ref, ref) > 100).all()
    assert (si_snr(0.25 * ref + 0.1, ref) > 100).all()  # scale and offset invariant
    noise = torch.randn(ref.shape, generator=gen)
    noise = noise / noise.pow(2).mean().sqrt() * ref.pow(2).mean().sqrt() * 10 ** (-20 / 20)
    np.testing.assert_allclose(si_snr(ref + noise, ref).numpy(), 20.0, atol=0.3)
    assert (si_snr(-ref, ref) > 100).all()  # a sign flip is only a scale


def test_adversarial_losses_hand_values():
    real = [torch.tensor([2.0, 0.5]), torch.tensor([[-1.0]])]
    fake = [torch.tensor([0.0, -2.0]), torch.tensor([[0.5]])]
    # relu(1 - real): [0, .5] -> .25, [2] -> 2 ; relu(1 + fake): [1, 0] -> .5, [1.5] -> 1.5
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx((0.25 + 0.5 + 2 + 1.5) / 2)
    # generator: relu(1 - fake): [1, 3] -> 2 ; [.5] -> .5
    assert hinge_generator_loss(fake).item() == pytest.approx((2 + 0.5) / 2)
    real_features = [[torch.tensor([1.0, -3.0])], [torch.tensor([2.0]), torch.tensor([4.0])]]
    fake_features = [[torch.tensor([2.0, -3.0])], [torch.tensor([2.0]), torch.tensor([0.0])]]
    # |diff| mean / |real| mean per map: (0.5 / 2), 0, (4 / 4) -> mean 1.25 / 3
    assert feature_matching_loss(fake_features, real_features).item() == pytest.approx(1.25 / 3)


# -- discriminator -------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 2])
def test_discriminator_shapes_and_backward(channels):
    torch.manual_seed(0)
    disc = MultiScaleSTFTDiscriminator(filters=4, in_channels=channels)
    assert len(disc.discriminators) == 5 and disc.min_length == 2048
    assert [d.n_fft for d in disc.discriminators] == [1024, 2048, 512, 256, 128]
    assert [d.hop_length for d in disc.discriminators] == [256, 512, 128, 64, 32]
    wav = torch.randn(3, channels, 4096, requires_grad=True)
    logits, features = disc(wav)
    assert len(logits) == len(features) == 5
    for d, out, maps in zip(disc.discriminators, logits, features):
        frames = (4096 - d.n_fft) // d.hop_length + 1
        freqs = d.n_fft // 2 + 1
        assert out.shape[:3] == (3, 1, frames)
        assert len(maps) == 5 and all(m.shape[:2] == (3, 4) for m in maps)
        assert maps[0].shape[2:] == (frames, freqs)
        assert maps[-1].shape[3] == out.shape[3] == math.ceil(freqs / 8)  # three stride-2 convs
    sum(out.mean() for out in logits).backward()
    assert torch.isfinite(wav.grad).all() and wav.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="shorter than"):
        disc(torch.randn(1, channels, 1000))


def test_discriminator_matches_reference_msstftd(monkeypatch):
    """Our module tree loads the original release's MS-STFT discriminator state dict (strict)
    and gives its logits and feature maps. The reference computes its STFT with torchaudio,
    which cannot load here: the stand-in's Spectrogram below frames, windows and FFTs
    explicitly (torchaudio's normalized=True: divide by the window's L2 norm)."""
    from oracles import import_encodec

    import_encodec()
    torchaudio = sys.modules["torchaudio"]
    if not hasattr(torchaudio.transforms, "Spectrogram"):
        class Spectrogram(torch.nn.Module):
            def __init__(self, *, n_fft, hop_length, win_length, window_fn, normalized, center,
                         pad_mode, power):
                super().__init__()
                assert win_length == n_fft and not center and power is None and normalized
                self.n_fft, self.hop = n_fft, hop_length
                self.window = window_fn(win_length)

            def forward(self, x):
                frames = x.unfold(-1, self.n_fft, self.hop) * self.window
                spec = torch.fft.rfft(frames.double(), dim=-1).to(torch.complex64)
                return (spec / self.window.pow(2).sum().sqrt()).transpose(-1, -2)

        monkeypatch.setattr(torchaudio, "transforms",
                            types.SimpleNamespace(**vars(torchaudio.transforms),
                                                  Spectrogram=Spectrogram))
    from encodec.msstftd import MultiScaleSTFTDiscriminator as Reference

    torch.manual_seed(0)
    ours = MultiScaleSTFTDiscriminator(filters=32)
    reference = Reference(filters=32, n_ffts=[1024, 2048, 512, 256, 128],
                          hop_lengths=[256, 512, 128, 64, 32],
                          win_lengths=[1024, 2048, 512, 256, 128])
    with torch.no_grad():  # random, non-trivial weight-norm gains
        for name, param in ours.named_parameters():
            param.copy_(torch.randn_like(param) * (0.5 if name.endswith("weight_g") else 0.1))
    reference.load_state_dict(ours.state_dict(), strict=True)
    wav = 0.3 * torch.randn(2, 1, 4100)
    with torch.no_grad():
        logits, features = ours(wav)
        ref_logits, ref_features = reference(wav)
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for maps, ref_maps in zip(features, ref_features):
        for a, b in zip(maps, ref_maps):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# -- balancer ------------------------------------------------------------------------------------
def _losses(y: torch.Tensor, factor: float = 1.0) -> dict[str, torch.Tensor]:
    weights = torch.linspace(-1, 1, y.shape[-1])
    return {"a": 1000 * factor * (y * weights).sum(),
            "b": y.pow(2).mean(),
            "c": 1e-3 * (y - 1).abs().mean()}


def _item_norm(grad: torch.Tensor) -> float:
    return grad.flatten(1).norm(dim=1).mean().item()


def test_balancer_gives_each_loss_its_share_of_the_gradient():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(3, 1, 50, generator=gen, requires_grad=True)
    weights = {"a": 1.0, "b": 2.0, "c": 7.0}
    balancer = Balancer(weights, total_norm=1.0)
    losses = _losses(y)
    grad, effective = balancer.output_gradient(losses, y)
    separate = {k: torch.autograd.grad(v, y, retain_graph=True)[0] for k, v in losses.items()}
    scales = {k: balancer.metrics[f"scale_{k}"] for k in weights}
    for name, w in weights.items():  # each share's per-item norm is w / sum(w)
        assert _item_norm(scales[name] * separate[name]) == pytest.approx(w / 10, rel=1e-5)
    torch.testing.assert_close(grad, sum(scales[k] * separate[k] for k in weights))
    assert effective.item() == pytest.approx(sum(scales[k] * losses[k].item() for k in weights),
                                             rel=1e-5)

    # second step: the norms are a bias-corrected EMA, (0.999 * n1 + n2) / (0.999 + 1)
    norm_a1 = _item_norm(separate["a"])
    losses = _losses(y, factor=5.0)
    balancer.output_gradient(losses, y)
    norm_a2 = _item_norm(torch.autograd.grad(losses["a"], y, retain_graph=True)[0])
    average = (0.999 * norm_a1 + norm_a2) / 1.999
    assert balancer.metrics["scale_a"] == pytest.approx(0.1 / average, rel=1e-5)

    # the averages are part of the state (resume)
    restored = Balancer(weights)
    restored.load_state_dict(balancer.state_dict())
    assert restored.state_dict() == balancer.state_dict()


def test_balancer_off_is_the_weighted_sum_and_checks_names():
    y = torch.randn(2, 1, 20, requires_grad=True)
    balancer = Balancer({"a": 0.5, "b": 3.0, "c": 0.0}, balance_grads=False)
    losses = _losses(y)
    grad, _ = balancer.output_gradient(losses, y)
    expected = torch.autograd.grad(0.5 * losses["a"] + 3.0 * losses["b"], y, retain_graph=True)[0]
    torch.testing.assert_close(grad, expected)
    with pytest.raises(ValueError, match="weights for"):
        balancer.output_gradient({"a": losses["a"]}, y)
    with pytest.raises(ValueError, match="non-negative"):
        Balancer({"a": -1.0})


# -- data ----------------------------------------------------------------------------------------
def test_scan_and_random_clips(corpus_dir):
    corpus = scan_audio_folder(corpus_dir)
    assert sorted(f.path.name for f in corpus.files) == ["short.wav", "stereo16k.flac",
                                                         "tone.wav"]
    assert [p.name for p, _ in corpus.skipped] == ["broken.wav"]
    data = clips(corpus_dir)
    first = [data[i] for i in range(12)]
    assert all(c.shape == (1, 2400) and c.dtype == torch.float32 for c in first)
    assert torch.equal(first[3], clips(corpus_dir)[3])  # a pure function of (seed, index)
    assert not torch.equal(first[3], clips(corpus_dir, seed=1)[3])
    used = {data.locate(i)[0].path.name for i in range(200)}
    assert used == {"short.wav", "stereo16k.flac", "tone.wav"}
    index = next(i for i in range(200) if data.locate(i)[0].path.name == "short.wav")
    assert torch.equal(data[index][:, 1000:], torch.zeros(1, 1400))  # padded
    with pytest.raises(FileNotFoundError):
        scan_audio_folder(corpus_dir / "missing")


def test_step_sampler_is_disjoint_across_processes_and_resumable():
    batches = {}
    for rank in range(2):
        sampler = iter(StepBatchSampler(batch_size=3, start_step=0, rank=rank, world_size=2))
        batches[rank] = [next(sampler) for _ in range(4)]
    flat = [i for rank in batches for batch in batches[rank] for i in batch]
    assert len(flat) == len(set(flat)) == 24
    resumed = iter(StepBatchSampler(batch_size=3, start_step=2, rank=1, world_size=2))
    assert next(resumed) == batches[1][2]


# -- trainer -------------------------------------------------------------------------------------
def _trainer(tmp_path: Path, accelerator, corpus_dir: Path, config=FAST, seed: int = 0
             ) -> CodecTrainer:
    trainer = CodecTrainer(build_codec(TINY, seed=seed), tmp_path, config,
                           valid_data=clips(corpus_dir, seed=99), accelerator=accelerator)
    trainer.echo = False
    return trainer


def test_codebook_choices():
    assert codebook_choices(EncodecModel(PRESETS["encodec_24khz"])) == [2, 4, 8, 16, 32]
    assert codebook_choices(EncodecModel(TINY)) == [1, 2, 4]


def test_training_steps_reduce_the_reconstruction_loss(tmp_path, accelerator, corpus_dir):
    """The generator path (straight-through quantizer, balancer, surrogate backward, Adam)
    fits a fixed batch. Reconstruction losses only: with the paper's weights 6/7 of the
    gradient comes from a discriminator that has not learnt anything yet after 20 steps."""
    config = replace(FAST, quantizer_dropout=False, loss_weights={"l1": 0.1, "mel": 1.0},
                     lr=1e-3)
    trainer = _trainer(tmp_path, accelerator, corpus_dir, config)
    data = clips(corpus_dir)
    batch = torch.stack([data[i] for i in range(4)])

    def reconstruction() -> float:
        decoded = trainer.reconstruct(batch, TINY.num_codebooks)
        return (trainer.mel_loss(decoded, batch) + 0.1 * (decoded - batch).abs().mean()).item()

    trainer.train_step(batch)  # k-means initializes the codebooks on this batch
    before = reconstruction()
    history = [trainer.train_step(batch) for _ in range(20)]
    assert reconstruction() < 0.75 * before
    assert all(h["codebooks"] == 4 and "disc" not in h for h in history)


def test_full_recipe_step_trains_both_networks(tmp_path, accelerator, corpus_dir):
    """With the paper's losses, each step updates the discriminator (probability 1 here) so
    that it separates real from decoded audio better, and the generator's losses are finite."""
    config = replace(FAST, quantizer_dropout=False, disc_update_prob=1.0)
    trainer = _trainer(tmp_path, accelerator, corpus_dir, config)
    data = clips(corpus_dir)
    batch = torch.stack([data[i] for i in range(4)])
    with torch.no_grad():
        decoded = trainer.reconstruct(batch, 4)

    def disc_loss() -> float:
        with torch.no_grad():
            real, _ = trainer.plain_discriminator(batch)
            fake, _ = trainer.plain_discriminator(decoded)
        return hinge_discriminator_loss(real, fake).item()

    before = disc_loss()
    history = [trainer.train_step(batch) for _ in range(4)]
    assert disc_loss() < before
    assert all({"l1", "mel", "adv", "feat", "disc", "commitment"} <= set(h) for h in history)
    assert all(math.isfinite(v) for h in history for v in h.values())
    assert trainer.balancer.metrics["scale_adv"] > 0


@pytest.mark.parametrize("precision, expected", [("same", torch.float32), ("bf16", torch.bfloat16)])
def test_discriminator_precision(tmp_path, accelerator, corpus_dir, precision, expected):
    """disc_precision "bf16": every discriminator convolution of a step (its update and the
    generator's adversarial losses) runs in bfloat16 while the codec's output stays float32;
    "same" follows the run's (here float32) autocast. Unknown values are refused."""
    config = replace(FAST, quantizer_dropout=False, disc_update_prob=1.0, disc_precision=precision)
    trainer = _trainer(tmp_path, accelerator, corpus_dir, config)
    data = clips(corpus_dir)
    batch = torch.stack([data[i] for i in range(2)])
    seen: dict[str, set] = {"disc": set(), "codec": set()}
    hooks = [module.register_forward_hook(lambda m, i, o, part=part: seen[part].add(o.dtype))
             for part, root in (("disc", trainer.plain_discriminator), ("codec", trainer.model.decoder))
             for module in root.modules() if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d))]
    try:
        metrics = trainer.train_step(batch)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == {"disc": {expected}, "codec": {torch.float32}}
    assert {"disc", "adv", "feat"} <= set(metrics) and all(math.isfinite(v) for v in metrics.values())
    with pytest.raises(ValueError, match="disc_precision"):
        replace(FAST, disc_precision="fp8")


def test_resume_is_exact_and_checkpoints_are_atomic(tmp_path, accelerator, corpus_dir):
    data = clips(corpus_dir)
    whole = _trainer(tmp_path / "whole", accelerator, corpus_dir)
    whole.fit(data)
    assert whole.step == 6

    class Killed(Exception):
        pass

    def kill_at_5(step: int) -> None:
        if step == 5:
            raise Killed

    killed = _trainer(tmp_path / "killed", accelerator, corpus_dir)
    with pytest.raises(Killed):
        killed.fit(data, on_step=kill_at_5)
    manager = CheckpointManager(tmp_path / "killed" / "checkpoints")
    assert [p.name for p in manager.all()] == ["step_000000002", "step_000000004"]
    # a crash while writing the next checkpoint leaves a temporary folder, never a step_ one
    partial = manager.folder / ".step_000000006.abc.tmp"
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"half a checkpoint")
    assert manager.latest().name == "step_000000004"

    resumed = _trainer(tmp_path / "killed", accelerator, corpus_dir, seed=123)  # other init
    assert resumed.resume().name == "step_000000004" and resumed.step == 4
    resumed.fit(data)
    assert resumed.step == 6
    for (name, a), (_, b) in zip(whole.model.state_dict().items(),
                                 resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(whole.plain_discriminator.state_dict().items(),
                                 resumed.plain_discriminator.state_dict().items()):
        assert torch.equal(a, b), name
    assert whole.balancer.state_dict() == resumed.balancer.state_dict()
    # keep_last=2 pruned the older ones and the stale temporary folder is gone
    assert [p.name for p in manager.all()] == ["step_000000004", "step_000000006"]
    assert not partial.exists()
    # logs and validation metrics were written; the export loads and equals the model
    assert (tmp_path / "killed" / "train_log.jsonl").read_text().count("valid_si_snr") >= 1
    exported = load_model(tmp_path / "killed" / "tiny", inference=False)
    for (name, a), (_, b) in zip(exported.state_dict().items(),
                                 resumed.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_weight_average_math_swap_and_state():
    from codec.training.ema import WeightAverage

    layer = torch.nn.Linear(3, 2)
    layer.bias.requires_grad_(False)  # frozen: not averaged
    layer.register_buffer("book", torch.zeros(2))
    start = layer.weight.detach().clone()
    average = WeightAverage(layer, decay=0.5)
    assert set(average.average) == {"weight"}
    with torch.no_grad():
        layer.weight.add_(2.0)
    average.update(layer)
    assert torch.allclose(average.average["weight"], start + 1.0)
    trained = layer.weight.detach().clone()
    with average.applied(layer):
        assert torch.allclose(layer.weight, start + 1.0)
    assert torch.equal(layer.weight, trained)  # put back, also after an error inside
    with pytest.raises(RuntimeError), average.applied(layer):
        raise RuntimeError
    assert torch.equal(layer.weight, trained)
    saved = average.state_dict()
    average.reset(layer)
    assert torch.equal(average.average["weight"], trained)
    average.load_state_dict(saved)
    assert torch.allclose(average.average["weight"], start + 1.0)
    with pytest.raises(ValueError, match="same parameters"):
        average.load_state_dict({"average": {"bias": torch.zeros(2)}})
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="decay"):
            WeightAverage(layer, decay=bad)


def test_ema_decay_validates_and_exports_the_average_and_resumes_it(tmp_path, accelerator, corpus_dir):
    """With ema_decay the export holds the weight average (not the last step's weights), the
    checkpoints carry it, a resumed run continues it exactly, and a run resumed without one
    starts it at the loaded weights."""
    config = replace(FAST, quantizer_dropout=False, train_parts="decoder", ema_decay=0.5, valid_every=100)
    data = clips(corpus_dir)
    whole = _trainer(tmp_path / "whole", accelerator, corpus_dir, config)
    whole.fit(data)
    decoder = {k: v for k, v in whole.model.state_dict().items() if k.startswith("decoder.")}
    exported = load_model(tmp_path / "whole" / "tiny", inference=False).state_dict()
    averaged = whole.average.average
    assert set(averaged) == {k for k, p in whole.model.named_parameters() if p.requires_grad}
    assert all(k.startswith("decoder.") for k in averaged)
    for name, value in averaged.items():
        assert torch.equal(exported[name], value), name
    assert any(not torch.equal(exported[k], decoder[k]) for k in averaged)
    for name in exported:  # the encoder and codebooks are the trained model's
        if not name.startswith("decoder."):
            assert torch.equal(exported[name], whole.model.state_dict()[name]), name

    half = _trainer(tmp_path / "half", accelerator, corpus_dir, replace(config, steps=4))
    half.fit(data)
    resumed = _trainer(tmp_path / "half", accelerator, corpus_dir, config)
    resumed.resume()
    resumed.fit(data)
    for name, value in whole.average.average.items():
        assert torch.equal(resumed.average.average[name], value), name

    plain = _trainer(tmp_path / "plain", accelerator, corpus_dir, replace(config, steps=4, ema_decay=None))
    plain.fit(data)
    assert CheckpointManager.load(CheckpointManager(tmp_path / "plain" / "checkpoints").latest(),
                                  CodecTrainer.kind)["average"] is None
    late = _trainer(tmp_path / "plain", accelerator, corpus_dir, config)
    late.resume()
    for name, value in late.average.average.items():
        assert torch.equal(value, dict(late.model.named_parameters())[name]), name
    with pytest.raises(ValueError, match="ema_decay"):
        replace(FAST, ema_decay=1.5)


def test_checkpoint_of_another_codec_is_refused(tmp_path, accelerator, corpus_dir):
    trainer = _trainer(tmp_path, accelerator, corpus_dir, replace(FAST, steps=2))
    trainer.fit(clips(corpus_dir))
    other = CodecTrainer(build_codec(replace(TINY, codebook_size=32)), tmp_path, FAST,
                         accelerator=accelerator)
    with pytest.raises(ValueError, match="codebook_size"):
        other.resume()
    with pytest.raises(ValueError, match="entropy_lm"):
        CheckpointManager.load(CheckpointManager(tmp_path / "checkpoints").latest(), "entropy_lm")


def test_resume_skips_a_truncated_latest_checkpoint(tmp_path, accelerator, corpus_dir):
    """A damaged newest state.pt is named in a warning and the run resumes from the one before;
    with no intact checkpoint left, the error names each damaged one."""
    trainer = _trainer(tmp_path, accelerator, corpus_dir, replace(FAST, steps=4, keep_last=3))
    trainer.fit(clips(corpus_dir))
    manager = CheckpointManager(tmp_path / "checkpoints")
    latest = manager.latest() / "state.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"step_000000004.*state\.pt"):
        CheckpointManager.load(latest.parent, "codec")
    resumed = _trainer(tmp_path, accelerator, corpus_dir, replace(FAST, steps=4, keep_last=3))
    with pytest.warns(UserWarning, match=r"step_000000004 \(.*state\.pt.*\); resuming from step_000000002"):
        assert resumed.resume().name == "step_000000002"
    assert resumed.step == 2
    (tmp_path / "checkpoints" / "step_000000002" / "state.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(FileNotFoundError, match=r"no intact checkpoint.*step_000000004.*step_000000002"):
        _trainer(tmp_path, accelerator, corpus_dir, replace(FAST, steps=4, keep_last=3)).resume()


def test_inference_prepared_model_is_refused_and_folded_files_reload(tmp_path, accelerator):
    model = build_codec(TINY)
    folded = build_codec(TINY).prepare_for_inference()
    folded.quantizer.vq.layers[0]._codebook.inited.fill_(1)
    with pytest.raises(ValueError, match="prepared for inference"):
        CodecTrainer(folded, tmp_path, FAST, accelerator=accelerator)
    folded.save_pretrained(tmp_path / "folded")
    reloaded = load_codec_for_training(tmp_path / "folded", name="again")
    assert reloaded.name == "again" and reloaded.training
    assert any(k.endswith("weight_g") for k in reloaded.state_dict())
    wav = 0.1 * torch.randn(1, 1, 2400)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.decoder(reloaded.encoder(wav)),
                                   model.decoder(model.encoder(wav)))


def test_entropy_lm_training_reduces_its_loss_and_codes_ecdc(tmp_path, accelerator, corpus_dir):
    codec = build_codec(TINY)
    with torch.no_grad():  # spread the codebooks over the encoder's outputs
        codec.train()
        codec.quantizer(codec.encoder(torch.stack([clips(corpus_dir)[i] for i in range(8)])))
    codec.prepare_for_inference()
    torch.manual_seed(0)
    lm = EntropyLM.for_codec(num_codebooks=4, card=16, frame_rate=codec.frame_rate)
    config = EntropyLMTrainConfig(steps=4, batch_size=4, segment_seconds=0.2, valid_clips=4,
                                  valid_every=2, checkpoint_every=2, num_workers=0, lr=2e-3)
    data = clips(corpus_dir, seconds=0.2)
    trainer = EntropyLMTrainer(codec, lm, tmp_path, config, accelerator=accelerator,
                               valid_data=clips(corpus_dir, seed=5, seconds=0.2))
    trainer.echo = False
    batch = torch.stack([data[i] for i in range(4)])
    codes = codec_codes(codec, batch)  # the LM fits the codes it is trained on
    before = trainer.evaluate(codes)
    assert before == pytest.approx(math.log2(16), abs=0.6)  # an untrained LM: about uniform
    for _ in range(30):
        trainer.train_step(batch)
    after = trainer.evaluate(codes)
    assert after < before - 0.5, (before, after)
    assert trainer.validate()  # held-out clips are scored too

    trainer.fit(data)  # checkpoints and the exported prior
    lm_file = tmp_path / f"{ecdc.lm_name('tiny')}.th"
    assert lm_file.is_file()
    loaded = ecdc.load_entropy_lm(codec, models_dir=tmp_path)
    wav = batch[0]
    plain = ecdc.compress(wav, SR, codec)
    coded = ecdc.compress(wav, SR, codec, use_lm=True, lm=loaded)
    torch.testing.assert_close(ecdc.decompress(coded, codec, lm=loaded)[0],
                               ecdc.decompress(plain, codec)[0])


def test_visqol_is_optional_and_gets_48khz_mono_files(monkeypatch, tmp_path):
    seen = {}

    class FakeApi:
        def create(self, mode):
            seen["mode"] = mode

        def measure(self, reference, degraded):
            for key, path in (("reference", reference), ("degraded", degraded)):
                seen[key] = audio.audio_info(path)
            return types.SimpleNamespace(moslqo=4.25)

    monkeypatch.setitem(sys.modules, "visqol", types.SimpleNamespace(VisqolApi=FakeApi))
    wav = torch.randn(2, SR) * 0.1
    assert visqol_score(wav, wav, SR) == 4.25
    assert seen["mode"] == "audio"
    assert (seen["reference"].sample_rate, seen["reference"].channels) == (48_000, 1)
    assert seen["degraded"].frames == 48_000
    assert visqol_score(wav[:, : SR // 2], wav[:, : SR // 2], SR) is None  # too short to score
    monkeypatch.setitem(sys.modules, "visqol", None)  # not installed: no score
    assert visqol_score(wav, wav, SR) is None


# -- CLI -----------------------------------------------------------------------------------------
TINY_SETS = ["--set", "n_filters=4", "--set", "dimension=8", "--set", "num_codebooks=4",
             "--set", "codebook_size=16", "--set", "lstm=0"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_train_codec_end_to_end(tmp_path, capsys, corpus_dir):
    out = tmp_path / "run"
    common = [corpus_dir, "--out", out, "--batch-size", 2, "--segment-seconds", 0.1,
              "--checkpoint-every", 2, "--log-every", 1, "--valid-clips", 2, "--valid-every", 2,
              "--num-workers", 0, "--cpu"]
    code, stdout, err = run(capsys, "train-codec", *common, "--name", "mini", "--steps", 2,
                            *TINY_SETS)
    assert code == 0, err
    assert "model written to" in stdout and "valid_si_snr@" in err
    assert "warning: skipped 1 unreadable audio file(s)" in err and "broken.wav" in err
    model = load_model(out / "mini")
    assert model.num_codebooks == 4 and model.name == "mini"

    # the same folder again needs --resume; --resume keeps the codec and goes on
    code, _, err = run(capsys, "train-codec", *common, "--steps", 3, *TINY_SETS)
    assert code == 1 and "--resume" in err
    code, _, err = run(capsys, "train-codec", *common, "--steps", 3, "--resume", "-q")
    assert code == 0, err
    assert [p.name for p in CheckpointManager(out / "checkpoints").all()][-1] == "step_000000003"

    wav_in = tmp_path / "in.wav"
    audio.write_audio(wav_in, clips(corpus_dir, seconds=0.3)[0], SR)
    code, stdout, err = run(capsys, "compress", "--model", out / "mini", "-n", 2, wav_in,
                            tmp_path / "x.ecdc")
    assert code == 0, err
    code, _, err = run(capsys, "decompress", "--model", out / "mini", tmp_path / "x.ecdc",
                       tmp_path / "back.wav")
    assert code == 0, err
    code, _, err = run(capsys, "roundtrip", "--model", out / "mini", "-b", 0.6, wav_in,
                       tmp_path / "rt.wav")
    assert code == 0, err
    assert audio.audio_info(tmp_path / "rt.wav").frames == audio.audio_info(wav_in).frames

    code, stdout, err = run(capsys, "train-codec", corpus_dir, "--out", out, "--name", "mini",
                            "--train-entropy-lm", "--steps", 2, "--batch-size", 2,
                            "--segment-seconds", 0.2, "--valid-clips", 2, "--num-workers", 0,
                            "--cpu")
    assert code == 0, err
    assert (out / "mini_lm.th").is_file() and "valid_bits_per_code@4" in err

    # the CLI finds the trained entropy LM beside the model folder
    code, _, err = run(capsys, "compress", "--model", out / "mini", "-n", 2, "--lm", wav_in,
                       tmp_path / "lm.ecdc")
    assert code == 0, err
    assert ecdc.read_header((tmp_path / "lm.ecdc").read_bytes())[0].use_lm
    code, _, err = run(capsys, "decompress", "--model", out / "mini", tmp_path / "lm.ecdc",
                       tmp_path / "lm.wav")
    assert code == 0, err
    same, _ = audio.read_audio(tmp_path / "back.wav")
    assert torch.equal(audio.read_audio(tmp_path / "lm.wav")[0], same)


def test_cli_train_codec_errors(tmp_path, capsys, corpus_dir):
    code, _, err = run(capsys, "train-codec", corpus_dir, "--out", tmp_path / "r", "--set",
                       "bogus=1")
    assert code == 1 and "bogus" in err and err.count("\n") == 1
    code, _, err = run(capsys, "train-codec", corpus_dir, "--out", tmp_path / "r", "--set",
                       "n_filters=many")
    assert code == 1 and "n_filters" in err
    code, _, err = run(capsys, "train-codec", tmp_path / "nothing", "--out", tmp_path / "r",
                       "--cpu", *TINY_SETS)
    assert code == 1 and "not found" in err
    code, _, err = run(capsys, "train-codec", corpus_dir, "--out", tmp_path / "r", "--resume")
    assert code == 1 and "no checkpoint" in err
    code, _, err = run(capsys, "train-codec", corpus_dir, "--out", tmp_path / "r",
                       "--train-entropy-lm", "--cpu")
    assert code == 1 and "needs a trained codec" in err


def test_cli_resume_skips_a_truncated_latest_checkpoint(tmp_path, capsys, corpus_dir):
    """``train-codec --resume`` names a damaged newest checkpoint in a warning and goes on from
    the one before; with none intact it fails in one line naming them."""
    out = tmp_path / "run"
    common = [corpus_dir, "--out", out, "--batch-size", 2, "--segment-seconds", 0.1,
              "--checkpoint-every", 1, "--log-every", 1, "--valid-clips", 0, "--num-workers", 0,
              "--cpu", "-q"]
    code, _, err = run(capsys, "train-codec", *common, "--name", "mini", "--steps", 2, *TINY_SETS)
    assert code == 0, err
    newest = out / "checkpoints" / "step_000000002" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    code, _, err = run(capsys, "train-codec", *common, "--steps", 3, "--resume")
    assert code == 0, err
    assert (r"tokenwave: warning: skipping damaged checkpoint(s): step_000000002 (" in err
            and "state.pt" in err and "resuming from step_000000001" in err)
    manager = CheckpointManager(out / "checkpoints")
    assert [p.name for p in manager.all()] == ["step_000000001", "step_000000002", "step_000000003"]
    assert CheckpointManager.load(manager.latest(), "codec")["step"] == 3
    assert CheckpointManager.load(out / "checkpoints" / "step_000000002", "codec")["step"] == 2

    for folder in manager.all():
        (folder / "state.pt").write_bytes(b"PK\x03\x04 not a zip")
    code, _, err = run(capsys, "train-codec", *common, "--steps", 4, "--resume")
    assert code == 1 and err.count("\n") == 1
    assert "no intact checkpoint" in err and "step_000000003" in err and "step_000000001" in err
