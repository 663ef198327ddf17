"""The Gradio demo's page: music from prompts with any tokenwave generator, and the codec's round trip.

    tokenwave demo [--model PATH_OR_NAME] [--host 127.0.0.1] [--port 7860] [--share]
    python -m demos.command [same options]

**Generate** tab: prompts (one per line, up to :data:`MAX_PROMPTS`, generated as one batch),
duration, top-k, top-p, temperature, guidance, seed; the model (generator folders found in
``$TOKENWAVE_MODELS`` and ``assets/models``, or a folder typed in); an optional audio prompt to
continue and a melody for melody models; a progress bar fed by the generator's per-step
callback; per output a player, a mel spectrogram and a download. With **Stream** ticked, a live
player (``gr.Audio(streaming=True)``) plays the first prompt while it is generated (gradio
encodes live audio with ffmpeg, which must be installed).
**Codec** tab: upload audio, choose a codec and a bitrate, listen to the round trip through an
``.ecdc`` file beside the original, and read the file's size and real bitrate. The entropy-coding
box is enabled only for codecs that have an LM (:func:`demos.models.entropy_lm_status`); the
round trip is also an API endpoint, ``/codec_roundtrip`` (audio file, codec, codebook count,
entropy coding), for ``gradio_client``.

This module is the layout and the wiring only: what the widgets call lives in
:mod:`demos.handlers` (generation, the codec round trip, uploads) and :mod:`demos.models`
(choosing, loading and describing models), re-exported here. Every :class:`DemoError` is shown
as a message in the page, never a stack trace. Requests are queued and ``concurrency`` of them
run at once. gradio is imported only by :func:`build_app` and :func:`launch`.
"""
from __future__ import annotations

import io
import math
import os
import shutil
from pathlib import Path

from inference.config import DEFAULT_DURATION

from .handlers import (MAX_CODEC_SECONDS, MAX_DURATION, MAX_PROMPTS, SAMPLING, CodecRoundTrip, GeneratedClip,
                       Generation, StreamedAudio, codec_roundtrip, generate_music, generate_music_stream,
                       output_folder, parse_prompts, read_upload)
from .models import (EXAMPLES, RANDOM_LABEL, RANDOM_MODEL, DemoError, ModelChoice, bitrate_choices,
                     codec_choices, entropy_lm_status, find_generators, load_codec_model, load_generator,
                     model_choices, model_summary, one_line, random_generator)
from .spectrogram import spectrogram_image

MAX_SLIDER_SECONDS = 60.0  # the duration slider's end (longer through the API, up to MAX_DURATION)
DEFAULT_CONCURRENCY = 2
INTRO = """# tokenwave
Music from a text prompt with a codec language model, and the neural codec on its own.
Models run on this machine; nothing is downloaded."""


def duration_info(window: float | None = None) -> str:
    """The duration slider's note: past the model's window, generation slides."""
    where = f"the model's {window:g} s window" if window else "the model's window"
    return (f"up to {MAX_SLIDER_SECONDS:g} s; beyond {where} the generation slides on: each new part is "
            f"conditioned on the end of the last (slower, and the music may drift)")


def wav_bytes(piece: StreamedAudio) -> bytes:
    """A streamed piece as a 16-bit WAV file in memory (what gradio's streaming player takes)."""
    import soundfile  # noqa: PLC0415 -- a core dependency; imported where used

    buffer = io.BytesIO()
    soundfile.write(buffer, piece.audio, piece.sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _fail(error: Exception):
    """A ``gr.Error`` for the page: the message of a :class:`DemoError`, else a one-line summary."""
    import gradio as gr

    if isinstance(error, DemoError):
        return gr.Error(str(error), print_exception=False)
    return gr.Error(f"Something went wrong: {one_line(error)}")


def _clip_updates(result: Generation) -> list:
    """Updates for the players and spectrograms (one pair per prompt slot), the files, the info."""
    import gradio as gr

    updates = []
    for index in range(MAX_PROMPTS):
        if index < len(result.clips):
            clip = result.clips[index]
            label = f"{index + 1}: {clip.prompt or '(no text)'}"
            updates += [gr.update(value=str(clip.path), visible=True, label=label),
                        gr.update(value=clip.spectrogram, visible=True)]
        else:
            updates += [gr.update(value=None, visible=False), gr.update(value=None, visible=False)]
    return [*updates, [str(c.path) for c in result.clips], result.info]


def _missing_stream_tools() -> None:
    """Refuse streaming where gradio cannot encode live audio."""
    missing = [tool for tool in ("ffmpeg", "ffprobe") if shutil.which(tool) is None]
    if missing:
        raise DemoError(f"Streaming playback needs {' and '.join(missing)} (gradio encodes live audio "
                        "with ffmpeg and probes files with ffprobe): install them (e.g. apt-get install "
                        "ffmpeg) or untick Stream.")


def _generate_callback(folder: Path):
    """The Generate button's function (a generator: gradio streams what it yields)."""
    import gradio as gr

    def on_generate(prompts, duration, top_k, top_p, temperature, cfg_coef, seed, model, path, audio_prompt,
                    melody, stream=False, progress=gr.Progress()):
        """Outputs: the clips' players and spectrograms, the live player, the files, the info."""
        args = (prompts, duration, top_k, top_p, temperature, cfg_coef, seed, model, path, audio_prompt,
                melody)
        report = lambda fraction, text: progress(fraction, desc=text)  # noqa: E731
        keep = [gr.skip()] * (2 * MAX_PROMPTS)
        try:
            if not stream:
                updates = _clip_updates(generate_music(*args, workdir=folder, progress=report))
                yield [*updates[:-2], gr.update(visible=False), *updates[-2:]]
                return
            _missing_stream_tools()
            opened = False
            for item in generate_music_stream(*args, workdir=folder, progress=report):
                if isinstance(item, Generation):
                    updates = _clip_updates(item)
                    yield [*updates[:-2], gr.skip(), *updates[-2:]]
                    continue
                if not opened:  # show the live player before its first chunk
                    opened = True
                    yield [*keep, gr.update(visible=True), gr.skip(), "streaming the first prompt..."]
                yield [*keep, wav_bytes(item), gr.skip(), gr.skip()]
        except Exception as error:
            raise _fail(error) from None

    return on_generate


def on_model(model, path):
    """Outputs: the model's summary, the duration slider's note naming its window, and the guidance
    slider set to the model's own coefficient."""
    import gradio as gr

    try:
        summary = model_summary(model, path)
        generator = load_generator(model, path)
    except Exception as error:
        return f"Cannot use this model: {one_line(error)}", gr.skip(), gr.skip()
    return (summary, gr.update(info=duration_info(generator.max_duration)),
            gr.update(value=generator.default_sampling.cfg_coef))


def on_codec_change(codec):
    """Outputs: the bitrates the codec offers (the one nearest 6 kbps chosen), and the
    entropy-coding box (enabled only when the codec has an LM; its note says what is missing
    otherwise)."""
    import gradio as gr

    try:
        options = bitrate_choices(codec)
        has_lm, note = entropy_lm_status(codec)
    except Exception as error:
        raise _fail(error) from None
    per_codebook = load_codec_model(codec).bandwidth_per_codebook
    closest = min(options, key=lambda option: abs(math.log(option[1] * per_codebook / 6.0)))
    lm_box = gr.update(interactive=True, info=note) if has_lm else \
        gr.update(interactive=False, value=False, info=f"unavailable: {note}")
    return gr.update(choices=options, value=closest[1]), lm_box


def _codec_callback(folder: Path):
    """The Compress button's function (also the ``/codec_roundtrip`` endpoint)."""
    def on_codec(upload, codec, codebooks, use_lm):
        """Compress an audio file to .ecdc with a codec and decode the file back.

        Args:
            upload: the audio file to code.
            codec: a codec name, a codec or generator folder, or random:<preset>.
            codebooks: how many codebooks to keep (the bitrate); empty for all.
            use_lm: entropy-code with the codec's LM.
        Returns: the decoded wav, the .ecdc file, and a note on size and bitrate.
        """
        try:
            result = codec_roundtrip(upload, codec, codebooks, use_lm, workdir=folder)
        except Exception as error:
            raise _fail(error) from None
        return str(result.decoded_path), str(result.ecdc_path), result.info

    return on_codec


def _generate_inputs(gr):
    """The Generate tab's left column; returns its widgets by name."""
    w = {}
    w["prompts"] = gr.Textbox(label=f"Prompt (one per line, up to {MAX_PROMPTS})", lines=3,
                              placeholder=EXAMPLES[0])
    with gr.Row():
        w["duration"] = gr.Slider(0.5, MAX_SLIDER_SECONDS, value=DEFAULT_DURATION, step=0.5,
                                  label="Duration (seconds)",
                                  info=duration_info())
        w["seed"] = gr.Number(value=-1, precision=0, label="Seed (-1: random)")
    with gr.Accordion("Sampling", open=False):
        w["top_k"] = gr.Slider(0, 1000, value=SAMPLING.top_k, step=1, label="top-k (0: off)")
        w["top_p"] = gr.Slider(0.0, 1.0, value=SAMPLING.top_p, step=0.01,
                               label="top-p (0: off; wins over top-k)")
        w["temperature"] = gr.Slider(0.05, 2.0, value=SAMPLING.temperature, step=0.05, label="Temperature")
        w["cfg_coef"] = gr.Slider(1.0, 10.0, value=SAMPLING.cfg_coef, step=0.1, label="Guidance (1: off)")
    with gr.Accordion("Audio prompt and melody (optional)", open=False):
        w["audio_prompt"] = gr.Audio(sources=["upload", "microphone"], type="filepath",
                                     label="Continue this audio (the output starts with it)")
        w["melody"] = gr.Audio(sources=["upload", "microphone"], type="filepath",
                               label="Melody to follow (melody models only)")
    with gr.Row():
        w["generate"] = gr.Button("Generate", variant="primary", scale=3)
        w["stream"] = gr.Checkbox(False, label="Stream", scale=1,
                                  info="play the first prompt while it is generated")
    gr.Examples(examples=[[e] for e in EXAMPLES], inputs=[w["prompts"]], label="Examples")
    return w


def _generate_tab(gr, choices: list[ModelChoice], default: str, folder: Path):
    """The Generate tab; returns the model dropdown, the folder box, the summary and the duration
    and guidance sliders."""
    with gr.Row():
        with gr.Column(scale=3):
            w = _generate_inputs(gr)
        with gr.Column(scale=2):
            model = gr.Dropdown(choices=[(c.label, c.value) for c in choices], value=default, label="Model")
            model_path = gr.Textbox(label="...or a local checkpoint folder (wins when filled)",
                                    placeholder="/path/to/generator (press Enter)")
            model_info = gr.Markdown()
    info = gr.Markdown()
    outputs = []
    for index in range(MAX_PROMPTS):
        with gr.Row():
            outputs.append(gr.Audio(type="filepath", interactive=False, visible=index == 0,
                                    label=f"{index + 1}", scale=2))
            outputs.append(gr.Image(type="numpy", interactive=False, visible=index == 0,
                                    label="mel spectrogram", scale=3, height=180))
    live = gr.Audio(streaming=True, autoplay=True, interactive=False, visible=False,
                    label="Live: the first prompt as it is generated")
    files = gr.File(label="Download", file_count="multiple", interactive=False, height=120)
    sampling = ("prompts", "duration", "top_k", "top_p", "temperature", "cfg_coef", "seed")
    inputs = [w[name] for name in sampling]
    w["generate"].click(_generate_callback(folder),
                        inputs=[*inputs, model, model_path, w["audio_prompt"], w["melody"], w["stream"]],
                        outputs=[*outputs, live, files, info])
    model.change(on_model, [model, model_path], [model_info, w["duration"], w["cfg_coef"]])
    model_path.submit(on_model, [model, model_path], [model_info, w["duration"], w["cfg_coef"]])
    return model, model_path, model_info, w["duration"], w["cfg_coef"]


def _codec_tab(gr, codecs: list[ModelChoice], folder: Path):
    """The Codec tab; returns the codec dropdown, the bitrate dropdown and the entropy-coding box."""
    with gr.Row():
        with gr.Column():
            upload = gr.Audio(sources=["upload"], type="filepath", label="Original")
            codec = gr.Dropdown(choices=[(c.label, c.value) for c in codecs], value=codecs[0].value,
                                allow_custom_value=True, label="Codec (a name, a folder or random:<preset>)")
            # Custom values: API callers pass a codebook count; codec_roundtrip checks it.
            bitrate = gr.Dropdown(choices=[], allow_custom_value=True, label="Bitrate")
            use_lm = gr.Checkbox(False, label="Entropy coding with the codec's LM (smaller, slower)",
                                 interactive=False, info="choose a codec")
            compress = gr.Button("Compress and decode", variant="primary")
        with gr.Column():
            decoded = gr.Audio(type="filepath", interactive=False,
                               label="Round trip (decoded from the .ecdc)")
            ecdc_file = gr.File(label=".ecdc file", interactive=False, height=120)
            codec_info = gr.Markdown()
    codec.change(on_codec_change, codec, [bitrate, use_lm])
    compress.click(_codec_callback(folder), [upload, codec, bitrate, use_lm],
                   [decoded, ecdc_file, codec_info], api_name="codec_roundtrip")
    return codec, bitrate, use_lm


def build_app(model_path: str | os.PathLike | None = None, *, models_dir: str | os.PathLike | None = None,
              concurrency: int = DEFAULT_CONCURRENCY, workdir: str | os.PathLike | None = None):
    """The demo as a ``gr.Blocks`` (queued: ``concurrency`` requests run at once). ``model_path``
    (a folder or a registry name) is the default model; see :func:`model_choices`."""
    import gradio as gr

    choices, default = model_choices(model_path, models_dir)
    codecs = codec_choices(models_dir)
    folder = output_folder(workdir)
    with gr.Blocks(title="tokenwave", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        with gr.Tab("Generate"):
            model, model_path_box, model_info, duration, guidance = _generate_tab(gr, choices, default, folder)
        with gr.Tab("Codec"):
            codec, bitrate, use_lm = _codec_tab(gr, codecs, folder)
        demo.load(on_model, [model, model_path_box], [model_info, duration, guidance])
        demo.load(on_codec_change, codec, [bitrate, use_lm])
    demo.queue(default_concurrency_limit=max(1, int(concurrency)))
    return demo


def launch(model_path: str | os.PathLike | None = None, *, host: str = "127.0.0.1", port: int | None = 7860,
           share: bool = False, concurrency: int = DEFAULT_CONCURRENCY,
           models_dir: str | os.PathLike | None = None, workdir: str | os.PathLike | None = None,
           block: bool = True):
    """Build and serve the demo (on ``host``: localhost by default); returns the ``gr.Blocks``.
    ``block=False`` returns once the server runs (``demo.close()`` stops it)."""
    folder = output_folder(workdir)
    demo = build_app(model_path, models_dir=models_dir, concurrency=concurrency, workdir=folder)
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                allowed_paths=[str(folder)], quiet=not block)
    return demo


__all__ = ["CodecRoundTrip", "DemoError", "GeneratedClip", "Generation", "MAX_CODEC_SECONDS",
           "MAX_DURATION", "MAX_PROMPTS", "MAX_SLIDER_SECONDS", "ModelChoice", "RANDOM_LABEL",
           "RANDOM_MODEL", "StreamedAudio", "bitrate_choices", "build_app", "codec_choices",
           "codec_roundtrip", "duration_info", "entropy_lm_status", "find_generators", "generate_music",
           "generate_music_stream", "launch", "load_codec_model", "load_generator", "model_choices",
           "model_summary", "parse_prompts", "random_generator", "read_upload", "spectrogram_image",
           "wav_bytes"]
