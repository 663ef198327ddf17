"""The CLI's options and the demo's sliders and functions take their sampling defaults from
:class:`lm.sampling.SamplingConfig`, the one place they are written (issue 12)."""
from __future__ import annotations

import inspect

import pytest

from demos import app, handlers
from inference.cli.main import build_parser
from inference.config import DEFAULT_DURATION
from lm import LMConfig
from lm.sampling import SamplingConfig

DEFAULTS = SamplingConfig()
SLIDERS = ("top_k", "top_p", "temperature", "cfg_coef")


def test_cli_generate_defaults_are_the_sampling_config():
    args = build_parser().parse_args(["generate", "a prompt", "-o", "out.wav"])
    parsed = SamplingConfig(use_sampling=not args.greedy, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, two_step_cfg=args.two_step_cfg)
    assert parsed == DEFAULTS
    assert args.cfg_coef is None  # the model's own (tests/test_model_guidance.py)


def test_cli_generate_help_states_the_sampling_config_defaults():
    commands = next(a for a in build_parser()._actions if a.dest == "command")
    generate = commands.choices["generate"]
    helps = {action.dest: action.help for action in generate._actions}
    assert f"default {DEFAULTS.top_k}" in helps["top_k"]
    assert f"default {DEFAULTS.top_p:g}" in helps["top_p"]
    assert f"default {DEFAULTS.temperature:g}" in helps["temperature"]
    assert f"default: the model's, {DEFAULTS.cfg_coef:g} for MusicGen" in helps["cfg_coef"]


@pytest.mark.parametrize("function", [handlers.generate_music, handlers.generate_music_stream])
def test_demo_function_defaults_are_the_sampling_config(function):
    parameters = inspect.signature(function).parameters
    assert {name: parameters[name].default for name in SLIDERS} == {
        **{name: getattr(DEFAULTS, name) for name in SLIDERS}, "cfg_coef": None}  # None: the model's
    assert parameters["duration"].default == DEFAULT_DURATION


def test_demo_sliders_start_at_the_sampling_config():
    gr = pytest.importorskip("gradio")
    with gr.Blocks():
        widgets = app._generate_inputs(gr)
    assert {name: widgets[name].value for name in SLIDERS} == {name: getattr(DEFAULTS, name)
                                                               for name in SLIDERS}
    assert widgets["duration"].value == DEFAULT_DURATION


def test_lm_guidance_defaults_are_the_sampling_config():
    config = LMConfig()
    assert (config.cfg_coef, config.two_step_cfg) == (DEFAULTS.cfg_coef, DEFAULTS.two_step_cfg)
