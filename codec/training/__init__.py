"""Codec training: losses, MS-STFT discriminator, loss balancer, data, trainers, the run folder.

The EnCodec recipe (paper, section 3.4) as :class:`CodecTrainer` (:mod:`.trainer`), training of
the ``.ecdc`` entropy-coding LM as :class:`EntropyLMTrainer` (:mod:`.entropy_trainer`), both on
the step loop of :mod:`.loop`; :mod:`.run` is the run folder, checkpoints, random state, log and
launch checks shared with the LM fine-tuning loop. ``tokenwave train-codec`` runs the trainers.
Needs ``accelerate`` (the ``train`` extra).
"""
from .balancer import Balancer
from .data import Corpus, RandomClips, StepBatchSampler, scan_audio_folder
from .discriminator import MultiScaleSTFTDiscriminator, STFTDiscriminator
from .entropy_trainer import EntropyLMTrainConfig, EntropyLMTrainer
from .loop import CheckpointManager, LoopConfig, TrainingLoop, codebook_choices
from .losses import (
                     MelDistance,
                     MelSpectrogram,
                     MultiResolutionSTFTLoss,
                     MultiScaleMelLoss,
                     feature_matching_loss,
                     hinge_discriminator_loss,
                     hinge_generator_loss,
                     l1_time_loss,
                     mel_filterbank,
                     si_snr,
)
from .run import CheckpointFolder, JsonlLog, RunFolder
from .trainer import (
                     LOSS_WEIGHTS,
                     CodecTrainConfig,
                     CodecTrainer,
                     CodecTrainingModule,
                     build_codec,
                     load_codec_for_training,
)

__all__ = [
    "Balancer", "Corpus", "RandomClips", "StepBatchSampler", "scan_audio_folder",
    "MultiScaleSTFTDiscriminator", "STFTDiscriminator", "MelDistance", "MelSpectrogram",
    "MultiScaleMelLoss", "MultiResolutionSTFTLoss", "feature_matching_loss", "hinge_discriminator_loss",
    "hinge_generator_loss", "l1_time_loss", "mel_filterbank", "si_snr", "LOSS_WEIGHTS",
    "CheckpointManager", "CodecTrainConfig", "CodecTrainer", "CodecTrainingModule",
    "EntropyLMTrainConfig", "EntropyLMTrainer", "build_codec", "codebook_choices",
    "load_codec_for_training", "LoopConfig", "TrainingLoop", "CheckpointFolder", "JsonlLog",
    "RunFolder",
]
