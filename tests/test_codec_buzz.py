"""Frame-rate buzz: the measure (codec.training.buzz), the linear-frequency STFT loss that sees it,
and decoder-only fine-tuning (encoder and codebooks frozen: the codes stay exactly the same)."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from test_codec_training import (FAST, TINY, TINY_SETS, _trainer, accelerator, clips,  # noqa: F401
                                 corpus_dir, run)

from codec.formats import load_model
from codec.training import MultiResolutionSTFTLoss, build_codec
from codec.training.buzz import buzz_db, line_prominence
from codec.training.losses import frame_periodic_loss

SR = 32_000


def _noise(seconds: float, seed: int) -> torch.Tensor:
    return 0.1 * torch.randn(round(seconds * SR), generator=torch.Generator().manual_seed(seed))


def _pulses(seconds: float, period: int, amplitude: float) -> torch.Tensor:
    """One random waveform of ``period`` samples (RMS ``amplitude``) repeated: lines at every
    multiple of ``SR / period``, like a decoder's frame-synchronous pattern."""
    pattern = amplitude * torch.randn(period, generator=torch.Generator().manual_seed(7))
    return pattern.repeat(math.ceil(seconds * SR / period))[: round(seconds * SR)]


def test_buzz_is_zero_for_noise_and_large_for_a_frame_periodic_pattern():
    reference = _noise(4.0, 0)
    noisy = reference + 0.3 * _noise(4.0, 1)  # broadband error: no lines
    buzzing = reference + _pulses(4.0, 640, 0.05)  # a pattern repeating every 50 Hz frame
    assert abs(buzz_db(reference, noisy, SR, 50.0)) < 0.7
    assert buzz_db(reference, buzzing, SR, 50.0) > 6.0
    # Lines at 50 Hz multiples are not lines at 37 Hz multiples.
    assert abs(buzz_db(reference, buzzing, SR, 37.0)) < 1.5
    # Music that has partials at multiples of the rate itself is not blamed on the codec.
    harmonic = reference + sum(0.05 * torch.sin(2 * math.pi * 200 * k * torch.arange(len(reference)) / SR)
                               for k in range(1, 6))
    assert abs(buzz_db(harmonic, harmonic + 0.3 * _noise(4.0, 2), SR, 50.0)) < 0.7
    assert line_prominence(harmonic, SR, 50.0)[3] > 20  # 200 Hz: a line of the input itself


def test_buzz_checks_its_input():
    with pytest.raises(ValueError, match="rate_hz must be positive"):
        line_prominence(_noise(1.0, 0), SR, 0.0)
    with pytest.raises(ValueError, match="no multiple"):
        line_prominence(_noise(1.0, 0), SR, 20_000.0)
    with pytest.raises(ValueError, match=r"\(T,\) or \(C, T\)"):
        line_prominence(torch.zeros(1, 1, SR), SR, 50.0)


def test_linear_stft_loss_grows_with_the_buzz_and_has_gradients():
    reference = _noise(1.0, 0)[None, None]
    stft = MultiResolutionSTFTLoss()
    assert stft(reference, reference).item() < 1e-4
    losses = [stft(reference + _pulses(1.0, 640, a)[None, None], reference).item() for a in (0.005, 0.02, 0.05)]
    assert 0 < losses[0] < losses[1] < losses[2]
    estimate = (reference + _pulses(1.0, 640, 0.02)[None, None]).requires_grad_(True)
    stft(estimate, reference).backward()
    assert estimate.grad is not None and torch.isfinite(estimate.grad).all() and estimate.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="at least one"):
        MultiResolutionSTFTLoss(n_ffts=())


def test_frame_periodic_loss_keeps_frame_locked_error_only():
    reference = _noise(1.0, 0)[None, None]
    locked = frame_periodic_loss(reference + _pulses(1.0, 640, 0.02)[None, None], reference, hop_length=640)
    loose = frame_periodic_loss(reference + 0.2 * _noise(1.0, 1)[None, None], reference, hop_length=640)
    # the same error energy (RMS 0.02): all of it frame-locked survives, a tenth of the loose one does
    assert locked.item() == pytest.approx(0.04, rel=0.1)
    assert loose.item() < 0.2 * locked.item()
    shifted = frame_periodic_loss(reference + _pulses(1.0, 641, 0.02)[None, None], reference, hop_length=640)
    assert shifted.item() < 0.3 * locked.item()  # a period that is not the frame's averages away too
    with pytest.raises(ValueError, match="shorter than"):
        frame_periodic_loss(reference[..., :1000], reference[..., :1000], hop_length=640)


def test_decoder_only_training_keeps_the_codes(tmp_path, accelerator, corpus_dir):  # noqa: F811
    """--train-parts decoder: after training steps the encoder, codebooks (EMA included) and
    therefore the codes are bit-identical; the decoder changed; the spectral loss is logged."""
    config = replace(FAST, train_parts="decoder", loss_weights="spectral", lr=1e-3)
    trainer = _trainer(tmp_path, accelerator, corpus_dir, config)
    model = trainer.model
    assert not model.encoder.training and not model.quantizer.training and model.decoder.training
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("decoder.")}
    decoder = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("decoder.")}
    data = clips(corpus_dir)
    batch = torch.stack([data[i] for i in range(4)])
    with torch.no_grad():
        codes_before = trainer.generator.model.encode_to_codes(batch)  # frozen parts: always in eval
    history = [trainer.train_step(batch) for _ in range(3)]
    trainer.validate()  # validation toggles train/eval: the frozen parts must stay in eval
    history.append(trainer.train_step(batch))
    assert all("stft" in h and "frame" in h and "disc" not in h for h in history)
    state = model.state_dict()
    assert [k for k, v in frozen.items() if not torch.equal(state[k], v)] == []
    assert not model.encoder.training and not model.quantizer.training and model.decoder.training
    assert any(not torch.equal(state[k], v) for k, v in decoder.items())
    with torch.no_grad():
        assert torch.equal(model.eval().encode_to_codes(batch), codes_before)


def test_mel_statistics_loss_sees_flattened_dynamics_that_mean_losses_miss():
    """A band envelope flattened to its mean keeps the average spectrum, not the std over time."""
    from codec.training.losses import MelStatisticsLoss
    torch.manual_seed(0)
    rate = 16_000
    t = torch.arange(rate) / rate
    envelope = 0.55 + 0.45 * torch.sign(torch.sin(2 * math.pi * 4 * t))  # 4 Hz on/off notes
    tone = torch.sin(2 * math.pi * 440 * t)
    real = (envelope * tone)[None, None]
    flat = (envelope.pow(2).mean().sqrt() * tone)[None, None]  # same energy, no dynamics
    loss = MelStatisticsLoss(sample_rate=rate)
    assert loss(real, real).item() == 0.0
    assert loss(flat, real).item() > 10 * loss(real * 0.9, real).item()  # a gain change hardly counts
    with pytest.raises(ValueError, match="same shape"):
        loss(flat[..., :100], real)


@pytest.mark.parametrize("preset, adversarial", [("timbre", False), ("timbre_gan", True)])
def test_the_timbre_presets_train_the_decoder_with_the_statistics_loss(tmp_path, accelerator, corpus_dir,  # noqa: F811
                                                                      preset, adversarial):
    trainer = _trainer(tmp_path, accelerator, corpus_dir, replace(FAST, train_parts="decoder", loss_weights=preset,
                                                                  disc_update_prob=1.0))
    data = clips(corpus_dir)
    batch = torch.stack([data[i] for i in range(4)])
    with torch.no_grad():
        codes_before = trainer.generator.model.encode_to_codes(batch)  # frozen parts: always in eval
    history = [trainer.train_step(batch) for _ in range(2)]
    assert all("stats" in h and "stft" in h and ("disc" in h) == adversarial for h in history)
    assert all(("adv" in h and "feat" in h) == adversarial for h in history)
    with torch.no_grad():  # the codes stay those of the start: an LM trained on them stays valid
        assert torch.equal(trainer.generator.model.encode_to_codes(batch), codes_before)


def test_decoder_only_needs_a_trained_codec(tmp_path, capsys, corpus_dir):  # noqa: F811
    code, _, err = run(capsys, "train-codec", corpus_dir, "--out", tmp_path / "r", "--train-parts", "decoder",
                       "--cpu", *TINY_SETS)
    assert code == 1 and "--from" in err and err.count("\n") == 1
    with pytest.raises(ValueError, match="train_parts"):
        replace(FAST, train_parts="encoder")


def test_cli_decoder_fine_tune_end_to_end(tmp_path, capsys, corpus_dir):  # noqa: F811
    base = build_codec(replace(TINY, name="base"), seed=0)
    base.save_pretrained(tmp_path / "base")
    code, _, err = run(capsys, "train-codec", corpus_dir, "--out", tmp_path / "run", "--from", tmp_path / "base",
                       "--name", "tuned", "--train-parts", "decoder", "--loss-weights", "spectral", "--steps", "2",
                       "--batch-size", "2", "--segment-seconds", "0.2", "--valid-clips", "0", "--num-workers", "0",
                       "--cpu", "-q")
    assert code == 0, err
    tuned = load_model(tmp_path / "run" / "tuned")
    wav = clips(corpus_dir)[0][None]
    base.eval()
    with torch.no_grad():
        assert torch.equal(tuned.encode_to_codes(wav), base.encode_to_codes(wav))

    # Resuming a finished run (or with --steps at the step reached) trains nothing but still writes
    # the model it says it writes (a time-boxed run is stopped and exported so).
    import shutil

    shutil.rmtree(tmp_path / "run" / "tuned")
    code, _, err = run(capsys, "train-codec", corpus_dir, "--out", tmp_path / "run", "--resume", "--steps", "2",
                       "--cpu", "-q")
    assert code == 0, err
    assert torch.equal(load_model(tmp_path / "run" / "tuned").encode_to_codes(wav), base.encode_to_codes(wav))


def test_cli_adversarial_decoder_fine_tune_with_fewer_discriminator_scales(tmp_path, capsys, corpus_dir):  # noqa: F811
    """--loss-weights timbre_gan --disc-windows --disc-precision bf16 --ema-decay: the discriminator has
    the scales and precision asked for (what makes it affordable on a CPU), the run keeps a weight
    average of the decoder, the codes stay the base codec's; bad windows are refused."""
    from codec.training.loop import CheckpointManager
    from codec.training.trainer import CodecTrainer

    base = build_codec(replace(TINY, name="base"), seed=0)
    base.save_pretrained(tmp_path / "base")
    args = ["train-codec", corpus_dir, "--out", tmp_path / "run", "--from", tmp_path / "base", "--name", "gan",
            "--train-parts", "decoder", "--loss-weights", "timbre_gan", "--disc-filters", "4", "--steps", "2",
            "--batch-size", "2", "--segment-seconds", "0.2", "--valid-clips", "0", "--num-workers", "0",
            "--checkpoint-every", "2", "--cpu", "-q"]
    code, _, err = run(capsys, *args, "--disc-windows", "512,300")
    assert code == 2 and "powers of two" in err and not (tmp_path / "run").exists()
    code, _, err = run(capsys, *args, "--disc-windows", "256,128", "--disc-precision", "bf16", "--ema-decay", "0.9")
    assert code == 0, err
    state = CheckpointManager.load(CheckpointManager(tmp_path / "run" / "checkpoints").latest(), CodecTrainer.kind)
    assert tuple(state["train_config"]["disc_windows"]) == (256, 128)
    assert state["train_config"]["disc_precision"] == "bf16" and state["train_config"]["ema_decay"] == 0.9
    assert set(state["average"]["average"]) == {k for k in state["model"] if k.startswith("decoder.") and
                                                k.endswith(("weight_g", "weight_v", "bias"))}
    scales = {key.split(".")[1] for key in state["discriminator"] if key.startswith("discriminators.")}
    assert len(scales) == 2
    wav = clips(corpus_dir)[0][None]
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "run" / "gan").encode_to_codes(wav), base.eval().encode_to_codes(wav))


def test_cli_loss_weight_overrides_one_weight_of_the_preset_and_of_a_resumed_run(tmp_path, capsys, corpus_dir):  # noqa: F811
    """--loss-weight NAME=VALUE changes one weight of --loss-weights (0 drops the loss), also on
    --resume over the checkpoint's recipe; unknown names and bad values are refused before training."""
    from codec.training.loop import CheckpointManager
    from codec.training.trainer import CodecTrainer

    base = build_codec(replace(TINY, name="base"), seed=0)
    base.save_pretrained(tmp_path / "base")
    args = ["train-codec", corpus_dir, "--out", tmp_path / "run", "--from", tmp_path / "base", "--name", "w",
            "--train-parts", "decoder", "--loss-weights", "timbre", "--steps", "1", "--batch-size", "2",
            "--segment-seconds", "0.2", "--valid-clips", "0", "--num-workers", "0", "--checkpoint-every", "1",
            "--cpu", "-q"]
    for bad, message in (("stat=3", "NAME one of"), ("stats=x", "not a number"), ("stats=-1", "0 or more"),
                         ("stats", "NAME=VALUE")):
        code, _, err = run(capsys, *args, "--loss-weight", bad)
        assert code == 1 and message in err and not (tmp_path / "run").exists(), (bad, err)
    code, _, err = run(capsys, *args, "--loss-weight", "stats=3", "--loss-weight", "frame=0")
    assert code == 0, err

    def weights():
        state = CheckpointManager.load(CheckpointManager(tmp_path / "run" / "checkpoints").latest(), CodecTrainer.kind)
        return dict(state["train_config"]["loss_weights"])

    assert weights() == {"l1": 0.1, "mel": 1.0, "stft": 1.0, "frame": 0.0, "stats": 3.0}
    code, _, err = run(capsys, "train-codec", corpus_dir, "--out", tmp_path / "run", "--resume", "--steps", "2",
                       "--loss-weight", "mel=2", "--cpu", "-q")
    assert code == 0, err
    assert weights() == {"l1": 0.1, "mel": 2.0, "stft": 1.0, "frame": 0.0, "stats": 3.0}
