"""Codec training: losses, MS-STFT discriminator, loss balancer, data, trainers.

The EnCodec recipe (paper, section 3.4) as :class:`CodecTrainer`, and training of the
``.ecdc`` entropy-coding LM as :class:`EntropyLMTrainer`; ``tokenwave train-codec`` runs them.
Needs ``accelerate`` (the ``train`` extra).
"""
from .balancer import Balancer
from .data import Corpus, RandomClips, StepBatchSampler, scan_audio_folder
from .discriminator import MultiScaleSTFTDiscriminator, STFTDiscriminator
from .losses import (MelDistance, MelSpectrogram, MultiScaleMelLoss, feature_matching_loss,
                     hinge_discriminator_loss, hinge_generator_loss, l1_time_loss,
                     mel_filterbank, si_snr)
from .trainer import (LOSS_WEIGHTS, CheckpointManager, CodecTrainConfig, CodecTrainer,
                      CodecTrainingModule, EntropyLMTrainConfig, EntropyLMTrainer, build_codec,
                      codebook_choices, load_codec_for_training)

__all__ = [
    "Balancer", "Corpus", "RandomClips", "StepBatchSampler", "scan_audio_folder",
    "MultiScaleSTFTDiscriminator", "STFTDiscriminator", "MelDistance", "MelSpectrogram",
    "MultiScaleMelLoss", "feature_matching_loss", "hinge_discriminator_loss",
    "hinge_generator_loss", "l1_time_loss", "mel_filterbank", "si_snr", "LOSS_WEIGHTS",
    "CheckpointManager", "CodecTrainConfig", "CodecTrainer", "CodecTrainingModule",
    "EntropyLMTrainConfig", "EntropyLMTrainer", "build_codec", "codebook_choices",
    "load_codec_for_training",
]
