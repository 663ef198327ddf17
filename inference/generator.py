"""Text (and melody) to audio: the LM, the codec and the conditioners in one module.

:class:`MusicGen` turns prompts into conditions (``ConditionProvider`` + ``ConditionFuser``),
samples codes with :meth:`lm.LMModel.generate` under classifier-free guidance and decodes them
with the codec; :class:`AudioGen` is the same class with AudioGen's window and stride. Loading
and saving go through :mod:`inference.formats`, which never imports this module.

Sampling and guidance are one :class:`lm.sampling.SamplingConfig` (``sampling=`` and/or its
fields by name); arguments are checked once per call, before any work, by
:func:`inference.config.check_generation`; durations beyond the training window use the
sliding window of :func:`inference.config.iter_windows`, a melody cut to each window.
:meth:`MusicGen.generate_stream` yields audio while the LM runs: the LM releases each frame
once its most delayed codebook is sampled and :class:`CodecStream` decodes it incrementally;
the pieces concatenate to :meth:`MusicGen.generate`'s output.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from codec import audio as audio_io
from conditioning import (ChromaConditioner, ConditionFuser, ConditionProvider, FuserConfig, caption_attributes,
                          summed_input)
from lm import LMModel
from lm.sampling import GenerationArgumentError, SamplingConfig

from .codec_stream import Codec, CodecStream
from .config import (AUDIOGEN_CONFIG, DEFAULT_DURATION, MAX_DURATION, MUSICGEN_CONFIG, GeneratorConfig,
                     Window, check_generation, iter_windows)
from .formats import read_generator, save_generator
from .progress import Progress, WindowProgress, window_progress
from .prompts import (BatchAudio, batch_texts, check_audio_prompt, condition_texts, unpack_audio,
                      window_melody)
from .registry import DEFAULT_MODEL
from .results import GeneratedAudio, GeneratedAudioTokens, LMConditions

SUMMED = ("bpm", "key", "instrument")  # the conditioners the generator can sum into the LM input
DECODE_BLOCK_SECONDS = 60.0  # longer outputs are decoded block by block (memory ~ the output)


def _routed(fuser: FuserConfig, name: str) -> bool:
    try:
        fuser.mode_of(name)
    except KeyError:
        return False
    return True


class MusicGen(nn.Module):
    """LM + codec + condition provider/fuser: prompts in, waveforms out.

    ``lm`` predicts the codec's codes; ``codec`` is an :class:`~codec.model.EncodecModel`, or
    an :class:`~codec.model.InterleavedStereo` for stereo models (codebooks ``L0 R0 L1 R1 ...``);
    ``condition_provider`` holds the conditioners by attribute (``"description"`` text, and
    ``"self_wav"`` melody chroma for melody models); ``fuser`` routes them to cross-attention
    or a prefix. Load one with :meth:`from_pretrained`.
    """

    default_config = MUSICGEN_CONFIG

    def __init__(self, *, lm: LMModel, codec: Codec, condition_provider: ConditionProvider,
                 fuser: ConditionFuser | None = None, config: GeneratorConfig | None = None) -> None:
        super().__init__()
        self.lm = lm
        self.codec = codec
        self.condition_provider = condition_provider
        self.fuser = fuser if fuser is not None else ConditionFuser()
        self.config = config if config is not None else self.default_config
        self._check()
        self.eval()

    def _check(self) -> None:
        lm_config, fuser = self.lm.config, self.fuser.config
        if "description" not in self.condition_provider.conditioners:
            raise ValueError("the condition provider needs a 'description' (text) conditioner, found "
                             f"{self.condition_provider.attributes}")
        unsupported = [*fuser.input_interpolate, *(n for n in fuser.sum if n not in SUMMED)]
        if unsupported:
            raise ValueError(f"the generator sums only the tempo, key and instrument {SUMMED} into the LM input; "
                             f"fuser modes 'sum'/'input_interpolate' route {unsupported}")
        if fuser.sum and lm_config.pattern != "delay":
            raise ValueError(f"tempo/key conditioning needs one LM step per frame (the delay pattern), "
                             f"not {lm_config.pattern!r}")
        unrouted = [n for n in self.condition_provider.attributes if not _routed(fuser, n)]
        if unrouted:
            raise ValueError(f"the fuser has no mode for conditioner(s) {unrouted}")
        if fuser.cross and not lm_config.cross_attention:
            raise ValueError(f"the fuser routes {list(fuser.cross)} to cross-attention but the LM has none")
        codec_codebooks = self.codec.num_codebooks  # both channels for InterleavedStereo
        if lm_config.num_codebooks > codec_codebooks or lm_config.num_codebooks % self.codec.channels:
            raise ValueError(f"the LM models {lm_config.num_codebooks} codebooks; the codec has "
                             f"{codec_codebooks} ({self.codec.channels} channel(s))")
        if lm_config.card != self.codec.codebook_size:
            raise ValueError(f"the LM's vocabulary (card {lm_config.card}) differs from the codec's codebook "
                             f"size {self.codec.codebook_size}")

    # -- properties ----------------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return self.codec.sample_rate

    @property
    def frame_rate(self) -> int:
        return self.codec.frame_rate

    @property
    def channels(self) -> int:
        return self.codec.channels

    @property
    def device(self) -> torch.device:
        return self.lm.emb[0].weight.device

    @property
    def has_melody(self) -> bool:
        return "self_wav" in self.condition_provider.conditioners

    @property
    def max_duration(self) -> float:
        return self.config.max_duration

    # -- loading and saving --------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike = DEFAULT_MODEL, *,
                        device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None, t5_path: str | os.PathLike | None = None,
                        models_dir: str | os.PathLike | None = None, max_duration: float | None = None,
                        extend_stride: float | None = None, revision: str | None = None,
                        local_files_only: bool = False) -> MusicGen:
        """A ready generator from a folder (tokenwave, transformers or audiocraft format) or a name
        (default: the shipped ``tokenwave-small``, :data:`inference.registry.DEFAULT_MODEL`).

        ``device`` None picks CUDA when available, else CPU. ``dtype`` (default float32) is the
        LM's; the codec stays float32 and T5 float32 unless ``dtype`` is bfloat16. ``"int8"``,
        ``"int4"`` or ``"int4-g<N>"`` store the LM's matrices quantized (:mod:`lm.quant`; for
        CPU decoding), quantizing float checkpoints as they load. Weights are
        read memory-mapped onto a model built on the meta device (one copy in memory).
        ``t5_path`` points at the T5 an audiocraft checkpoint names; ``max_duration`` and
        ``extend_stride`` override the window the checkpoint implies. A Hugging Face name is read at
        ``revision`` (branch, tag or commit); ``local_files_only`` never downloads (:mod:`inference.hub`).
        See :mod:`inference.formats`.
        """
        parts = read_generator(path_or_name, default_config=cls.default_config, device=device, dtype=dtype,
                               t5_path=t5_path, models_dir=models_dir, max_duration=max_duration,
                               extend_stride=extend_stride, revision=revision,
                               local_files_only=local_files_only)
        return cls(**parts._asdict())

    def save_pretrained(self, path: str | os.PathLike, *, overwrite: bool = False) -> os.PathLike:
        """Write tokenwave's folder format (see :func:`inference.formats.save_generator`)."""
        return save_generator(self, path, overwrite=overwrite)

    # -- conditions ----------------------------------------------------------------------------
    def prepare_conditions(self, prompts: Sequence[str | None], *,
                           melodies: Sequence[torch.Tensor | None] | None = None,
                           guided: bool = True) -> LMConditions:
        """Encode B prompts (and melodies at the chroma's sample rate) into LM inputs.

        ``guided`` appends B null rows (no text, no melody) for classifier-free guidance (the
        result's ``guided``; False when the model has no condition at all to guide with).
        """
        texts = condition_texts(prompts)
        batch = len(texts)
        attributes: dict[str, list] = {"description": texts + ([None] * batch if guided else [])}
        if self.has_melody:
            rows = list(melodies) if melodies is not None else [None] * batch
            attributes["self_wav"] = rows + ([None] * batch if guided else [])
        elif melodies is not None and any(m is not None for m in melodies):
            raise ValueError("this model has no melody conditioner; melody= needs a melody model")
        conditions = {n: c for n, c in self.condition_provider(attributes).items() if n not in self.fuser.config.sum}
        param = self.lm.emb[0].weight
        empty = torch.zeros(len(attributes["description"]), 0, self.lm.config.dim, dtype=param.dtype,
                            device=param.device)
        fused = self.fuser(empty, conditions)
        condition = condition_mask = None
        if fused.cross is not None:
            condition = fused.cross.to(param.dtype)
            if self.config.mask_condition_padding:
                condition_mask = fused.cross_mask
        prefix = fused.input if fused.prepend_length else None
        # Prepended conditions are attended in full (padding holds zeros), as audiocraft and
        # transformers' MusicGen-melody do.
        return LMConditions(condition, condition_mask, prefix, None,
                            guided=guided and (condition is not None or prefix is not None))

    def _chroma_rate(self) -> int:
        chroma: ChromaConditioner = self.condition_provider.conditioners["self_wav"]
        return chroma.config.sample_rate

    def _resample_melodies(self, melodies: BatchAudio, sample_rate: int) -> BatchAudio:
        """Melodies resampled to the chroma's rate ``(C, T)``."""
        target = self._chroma_rate()
        return [None if m is None else audio_io.resample(m.float(), sample_rate, target) for m in melodies]

    # -- codec ---------------------------------------------------------------------------------
    def encode_audio(self, wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """Audio ``(B, C, T)`` at any rate -> codes ``(B, K, frames)`` for the LM."""
        wav = audio_io.convert_audio(wav.float(), sample_rate, self.sample_rate, self.channels)
        wav = wav.to(next(self.codec.parameters()).device)
        per_channel = self.lm.config.num_codebooks // self.channels
        with torch.inference_mode():
            return self.codec.encode_to_codes(wav, per_channel)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, K, frames)`` -> waveforms ``(B, C, frames * hop)`` float32.

        Beyond :data:`DECODE_BLOCK_SECONDS` the codes go through :class:`CodecStream` block by
        block (the same audio to float rounding), so the decoder's activations, several times
        the audio's size for a whole file, stay those of one block.
        """
        block = max(1, int(DECODE_BLOCK_SECONDS * self.frame_rate))
        with torch.inference_mode():
            if tokens.shape[-1] <= block:
                return self.codec.decode(tokens.to(next(self.codec.parameters()).device)).float()
            stream = CodecStream(self.codec)
            pieces = [stream.push(piece) for piece in tokens.split(block, dim=-1)]
            return torch.cat([*pieces, stream.flush()], dim=-1)

    # -- generation ----------------------------------------------------------------------------
    @property
    def default_sampling(self) -> SamplingConfig:
        """:class:`lm.sampling.SamplingConfig`'s defaults with this model's own guidance coefficient
        (its LM config's ``cfg_coef``: 3 for MusicGen and audiocraft checkpoints, what its recipe
        measured best for tokenwave's own models), as transformers keeps a ``guidance_scale`` per model."""
        return SamplingConfig(cfg_coef=self.lm.config.cfg_coef)

    def _checked_sampling(self, duration: float, seed: int | None, extend_stride: float | None,
                           sampling: SamplingConfig | None, options: dict) -> SamplingConfig:
        """:func:`inference.config.check_generation` over :attr:`default_sampling` unless ``sampling`` is given."""
        return check_generation(duration=duration, seed=seed, extend_stride=extend_stride,
                                sampling=self.default_sampling if sampling is None else sampling, **options)

    def generate(self, prompts: str | Sequence[str | None] | None, duration: float = DEFAULT_DURATION, *,
                 sampling: SamplingConfig | None = None, seed: int | None = None, progress: Progress = False,
                 return_tokens: bool = False, audio_prompt: tuple[torch.Tensor, int] | None = None,
                 melody: tuple[torch.Tensor | Sequence[torch.Tensor | None], int] | None = None,
                 extend_stride: float | None = None, fast: bool = False, **options: Any
                 ) -> GeneratedAudio | GeneratedAudioTokens:
        """Generate ``duration`` seconds of audio per prompt.

        Args:
            prompts: one string (one prompt, never split into characters), a list of them (a
                batch), ``None``/``""`` entries for unconditional generation. ``None`` alone:
                unconditional, batch size from ``audio_prompt``/``melody`` or 1.
            duration: seconds of output, an audio prompt included (default 10, at most
                :data:`MAX_DURATION`, 1 hour).
            sampling: how tokens are picked (default: :attr:`default_sampling`, the sampling
                defaults with the model's own guidance coefficient).
            **options: fields of ``sampling`` replaced by name: ``top_k``, ``top_p`` (wins over
                top_k when > 0), ``temperature``, ``use_sampling`` (False: greedy), ``cfg_coef``
                (1 = no guidance; default the model's), ``two_step_cfg``.
            seed: makes sampling reproducible (None: torch's global generator).
            progress: True shows a tqdm bar; a callable is called as ``progress(step, total)``
                after every LM step (steps of all windows counted together).
            return_tokens: also return the codes ``(B, K, frames)``.
            audio_prompt: ``(wav, sample_rate)`` with wav ``(B, C, T)`` or ``(C, T)``: continue
                this audio; the output starts with it (re-encoded), its tokens unchanged.
            melody: ``(wavs, sample_rate)``, wavs ``(B, C, T)``, ``(C, T)`` or B items of
                ``(C, T)``/None: melody conditioning through the chroma (melody models only).
            extend_stride: seconds per sliding-window step (default: the model's, 18 s for MusicGen).
            fast: LM steps through the static-cache decoder (:mod:`lm.static_decoder`; a CUDA graph on
                CUDA). Off by default until the CUDA capture has run on a GPU. See
                :meth:`lm.LMModel.generate`.

        Returns:
            ``(wav (B, C, T), sample_rate)``, plus ``tokens`` when ``return_tokens``.

        Raises:
            ValueError (:class:`~lm.sampling.GenerationArgumentError`, naming the argument) before
            any work, for what :func:`inference.config.check_generation` refuses.
        """
        sampling = self._checked_sampling(duration, seed, extend_stride, sampling, options)
        texts, prompt_codes, melody_wavs = self._prepare_inputs(prompts, audio_prompt, melody)
        tokens = torch.cat(list(self._token_pieces(texts, duration, sampling, prompt_codes, melody_wavs, seed,
                                                   progress, extend_stride, fast)), dim=-1)
        wav = self.decode(tokens)
        if return_tokens:
            return GeneratedAudioTokens(wav, self.sample_rate, tokens)
        return GeneratedAudio(wav, self.sample_rate)

    @torch.inference_mode()
    def generate_stream(self, prompts: str | Sequence[str | None] | None,
                        duration: float = DEFAULT_DURATION, *, first_chunk_frames: int = 10,
                        chunk_frames: int = 25, sampling: SamplingConfig | None = None,
                        seed: int | None = None, progress: Progress = False,
                        audio_prompt: tuple[torch.Tensor, int] | None = None,
                        melody: tuple[torch.Tensor | Sequence[torch.Tensor | None], int] | None = None,
                        extend_stride: float | None = None, fast: bool = False,
                        **options: Any) -> Iterator[torch.Tensor]:
        """:meth:`generate`, yielding audio ``(B, C, n)`` float32 while the LM still runs.

        Frames are decoded as soon as the LM has sampled all their codebooks: the first
        ``first_chunk_frames`` frames (an audio prompt's included) go to the codec at once,
        then every ``chunk_frames`` frames, the rest at the end. The codec decodes them with
        its streaming decoder (:class:`codec.streaming.StreamingDecoder`), which yields every
        sample no later frame can change: all of a pushed frame for a causal codec (24 kHz;
        its first 7 frames come together), all but the last ~75 ms for the non-causal 32/16 kHz
        codecs (their lookahead, 3.75 frames at 32 kHz), which come with the next chunk. While
        that hold-back swallows the whole first chunk, frames are pushed one at a time until
        the first samples come out. The yielded pieces, concatenated, are :meth:`generate`'s
        waveform for the same arguments and seed, to float rounding (~1e-7). Codecs that
        encode in normalized segments (48 kHz) cannot decode a frame before the whole
        sequence is known: they yield everything in one piece at the end.

        Arguments are :meth:`generate`'s; the stream stops generating when it is closed.
        """
        if first_chunk_frames < 1 or chunk_frames < 1:
            raise ValueError(f"first_chunk_frames and chunk_frames must be at least 1, got "
                             f"{first_chunk_frames} and {chunk_frames}")
        sampling = self._checked_sampling(duration, seed, extend_stride, sampling, options)
        texts, prompt_codes, melody_wavs = self._prepare_inputs(prompts, audio_prompt, melody)
        codes = self._token_pieces(texts, duration, sampling, prompt_codes, melody_wavs, seed, progress,
                                   extend_stride, fast)
        decoder = CodecStream(self.codec)
        pending: list[torch.Tensor] = []
        waiting, wanted, started = 0, first_chunk_frames, False
        try:
            for piece in codes:
                pending.append(piece)
                waiting += piece.shape[-1]
                if waiting >= wanted:
                    audio = decoder.push(torch.cat(pending, dim=-1))
                    pending, waiting = [], 0
                    if audio.shape[-1]:
                        started, wanted = True, chunk_frames
                        yield audio
                    elif not started:  # the codec's lookahead holds it all back: retry every frame
                        wanted = 1
        finally:
            codes.close()  # a closed stream stops the LM at once (and closes its progress bar)
        if pending:
            audio = decoder.push(torch.cat(pending, dim=-1))
            if audio.shape[-1]:
                yield audio
        audio = decoder.flush()
        if audio.shape[-1]:
            yield audio

    def _prepare_inputs(self, prompts, audio_prompt, melody
                        ) -> tuple[list[str | None], torch.Tensor | None, list[torch.Tensor | None] | None]:
        """Texts, the audio prompt's codes ``(B, K, T0)`` and melodies at the chroma's rate."""
        prompt_wavs, prompt_rate = unpack_audio(audio_prompt, "audio_prompt") if audio_prompt is not None \
            else (None, None)
        melody_wavs, melody_rate = unpack_audio(melody, "melody") if melody is not None else (None, None)
        texts = batch_texts(prompts, prompt_wavs, melody_wavs)
        prompt_codes = None
        if prompt_wavs is not None:
            if any(w is None for w in prompt_wavs):
                raise ValueError("audio_prompt items must all be audio (no None)")
            lengths = {w.shape[-1] for w in prompt_wavs}
            if len(lengths) > 1:
                raise ValueError(f"audio prompts must share one length, found lengths {sorted(lengths)}")
            prompt_codes = self.encode_audio(torch.stack(prompt_wavs), prompt_rate)
        if melody_wavs is not None:
            if not self.has_melody:
                raise ValueError("this model has no melody conditioner; melody= needs a melody model")
            melody_wavs = self._resample_melodies(melody_wavs, melody_rate)
        return texts, prompt_codes, melody_wavs

    def num_frames(self, duration: float) -> int:
        """Frames for ``duration`` seconds: ``floor(duration * frame_rate)`` (float noise forgiven)."""
        if not duration > 0:
            raise ValueError(f"duration must be a positive number of seconds, found {duration}")
        return math.floor(duration * self.frame_rate + 1e-9)

    def generate_tokens(self, prompts: Sequence[str | None], duration: float, *,
                        prompt_codes: torch.Tensor | None = None,
                        melodies: list[torch.Tensor | None] | None = None,
                        sampling: SamplingConfig | None = None, seed: int | None = None,
                        progress: Progress = False, extend_stride: float | None = None,
                        fast: bool = False, **options: Any) -> torch.Tensor:
        """Codes ``(B, K, frames)`` for B prompts; ``prompt_codes (B, K, T0)`` continues them and
        ``melodies`` (at the chroma's rate) condition melody models. See :meth:`generate`.

        The concatenation of what :meth:`generate_tokens_iter` yields.
        """
        return torch.cat(list(self.generate_tokens_iter(
            prompts, duration, prompt_codes=prompt_codes, melodies=melodies, sampling=sampling, seed=seed,
            progress=progress, extend_stride=extend_stride, fast=fast, **options)), dim=-1)

    def generate_tokens_iter(self, prompts: Sequence[str | None], duration: float, *,
                             prompt_codes: torch.Tensor | None = None,
                             melodies: list[torch.Tensor | None] | None = None,
                             sampling: SamplingConfig | None = None, seed: int | None = None,
                             progress: Progress = False, extend_stride: float | None = None,
                             fast: bool = False, **options: Any) -> Iterator[torch.Tensor]:
        """Codes ``(B, K, n)`` of consecutive frames, each piece as soon as its frames are final.

        Over a sliding window, each window's frames stream as it generates them; the frames a
        window takes as its prompt were yielded by the window before and are not repeated.
        """
        sampling = self._checked_sampling(duration, seed, extend_stride, sampling, options)
        yield from self._token_pieces(list(prompts), duration, sampling, prompt_codes, melodies, seed,
                                      progress, extend_stride, fast)

    @torch.inference_mode()
    def _token_pieces(self, texts: list[str | None], duration: float, sampling: SamplingConfig,
                      prompt_codes: torch.Tensor | None, melodies: list[torch.Tensor | None] | None,
                      seed: int | None, progress: Progress, extend_stride: float | None,
                      fast: bool) -> Iterator[torch.Tensor]:
        """:meth:`generate_tokens_iter` on checked arguments (each entry point checks them once)."""
        batch = len(texts)
        total = self.num_frames(duration)
        window = self.num_frames(self.max_duration)
        stride = self._stride_frames(extend_stride)
        prompt_length = 0 if prompt_codes is None else prompt_codes.shape[-1]
        check_audio_prompt(prompt_length, total, window, stride, self.frame_rate)
        plan = iter_windows(total, window, stride, prompt_length)
        sliding = total > window
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        callback_for, close = self._progress(lambda: iter_windows(total, window, stride, prompt_length),
                                             progress)

        conditions = None
        prompt = None if prompt_codes is None else prompt_codes.to(self.device)
        try:
            for index, window_plan in enumerate(plan):
                callback = callback_for(index, window_plan)
                if conditions is None or (melodies is not None and sliding):
                    window_melodies = melodies if melodies is None or not sliding else window_melody(
                        melodies, window_plan, self.frame_rate, self.max_duration, self._chroma_rate())
                    conditions = self.prepare_conditions(texts, melodies=window_melodies,
                                                         guided=sampling.guided)
                if self.fuser.config.sum:  # the beat clock runs on from the window's first frame
                    rows = texts + [None] * len(texts) if conditions.guided else texts
                    steps = self.lm.pattern_provider.get_pattern(window_plan.length).num_steps
                    attributes = caption_attributes(rows, self.condition_provider)
                    conditions = conditions._replace(frame_input=summed_input(
                        self.condition_provider, self.fuser, attributes, steps=steps, start_frames=window_plan.offset))
                pieces, seen = [], 0
                skip = window_plan.prompt if index else 0  # an audio prompt is part of the output
                for piece in self.lm.generate_iter(
                        max_gen_len=window_plan.length, prompt=prompt,
                        num_samples=None if prompt is not None else batch, generator=generator,
                        callback=callback, fast=fast, guided=conditions.guided, **sampling.as_kwargs(),
                        **conditions.as_kwargs()):
                    pieces.append(piece)
                    new = piece[..., max(0, skip - seen):]
                    seen += piece.shape[-1]
                    if new.shape[-1]:
                        yield new
                prompt = torch.cat(pieces, dim=-1)[..., stride:] if sliding else None
        finally:
            close()

    def _stride_frames(self, extend_stride: float | None) -> int | None:
        """The sliding window's step in frames (None: the model has none and none was given)."""
        if extend_stride is not None and not extend_stride < self.max_duration:
            raise GenerationArgumentError("extend_stride", f"must be below the model's window "
                                          f"({self.max_duration:g} s), got {extend_stride:g}")
        seconds = self.config.extend_stride if extend_stride is None else extend_stride
        return None if seconds is None else int(seconds * self.frame_rate)

    def _progress(self, windows: Callable[[], Iterator[Window]], progress: Progress) -> WindowProgress:
        """Progress over all windows, in LM steps (see :func:`inference.progress.window_progress`)."""
        cache: dict[tuple[int, int], int] = {}

        def steps(window: Window) -> int:  # a few distinct (length, prompt) pairs: one pattern each
            key = (window.length, window.prompt)
            if key not in cache:
                pattern = self.lm.pattern_provider.get_pattern(window.length)
                cache[key] = pattern.num_steps - pattern.first_step_with_timestep(window.prompt)
            return cache[key]

        return window_progress(windows, steps, progress)


class AudioGen(MusicGen):
    """Text to sound (AudioGen): the same machinery, usually on the 16 kHz codec.

    audiocraft's AudioGen: 10 s training window (``dataset.segment_duration``), extend stride
    2 s, T5-large text encoder, cross-attention, sampling with top_k 250 and guidance 3.
    """

    default_config = AUDIOGEN_CONFIG


# DEFAULT_DURATION, MAX_DURATION, GeneratorConfig and check_generation are inference.config's,
# also importable from here (the command line imports them from this module).
__all__ = ["AudioGen", "CodecStream", "DEFAULT_DURATION", "GeneratedAudio", "GeneratedAudioTokens",
           "GeneratorConfig", "LMConditions", "MAX_DURATION", "MusicGen", "check_generation"]
