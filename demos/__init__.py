"""The Gradio demo (:mod:`demos.app`): ``tokenwave demo`` or ``python -m demos.app``.

Importing :mod:`demos.app` does not import gradio; only :func:`demos.app.build_app` and
:func:`demos.app.main` need it (``pip install 'tokenwave[demo]'``).
"""
