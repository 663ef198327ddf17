"""The Gradio demo: ``tokenwave demo`` or ``python -m demos.command``.

:mod:`demos.app` lays out the page and wires it to :mod:`demos.handlers` (generation, the codec
round trip, uploads), which use :mod:`demos.models` (choosing, loading and describing models)
and :mod:`demos.spectrogram` (the picture of each clip); :mod:`demos.command` is the
``tokenwave demo`` command. Importing any of them does not import gradio: only
:func:`demos.app.build_app` and :func:`demos.app.launch` need it (``pip install 'tokenwave[demo]'``).
"""
