"""Widen a trained codec's decoder, or give it an LSTM, without changing what it outputs, to fine-tune
the extra capacity.

Why: a small codec's decoder can be the bottleneck of its sound (tokenwave-small's renders every
instrument a little like strings: the codes keep the family, the 12-filter decoder does not), while
its codes are what a language model was trained on. Widening the decoder alone keeps the codes, and
starting from exactly the trained decoder's function keeps everything it learned.

How: every channel the wider decoder adds gets random incoming weights and zero weights into the
channels the trained decoder had, so the old channels compute exactly what they did and the new
ones start feeding them only once training moves those zeros. (Copying units, Net2Net's way, would
also preserve the function, but copies get equal updates under Adam and never diverge.) Weight
norm stays well defined: every output channel of a convolution, and every input channel of a
transposed one (its norm's axis), keeps a non-zero weight.
"""
from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from ..conv import WeightNormConv1d, WeightNormConvTranspose1d
from ..model import EncodecModel


def _convs(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d))]


def _weight(conv: nn.Module) -> torch.Tensor:
    return (conv.current_weight() if hasattr(conv, "current_weight") else conv.weight).detach()


def _set_weight(conv: nn.Module, weight: torch.Tensor) -> None:
    if isinstance(conv, (WeightNormConv1d, WeightNormConvTranspose1d)):
        conv.weight_v.data.copy_(weight)
        conv.weight_g.data.copy_(torch.linalg.vector_norm(weight, dim=(1, 2), keepdim=True))
    else:
        conv.weight.data.copy_(weight)


def _same_codes(model: EncodecModel, config, seed: int) -> EncodecModel:
    """A new codec for ``config`` (its decoder's new weights drawn from ``seed``) with ``model``'s
    encoder and codebooks as they are (weight norm folded or not), on ``model``'s device."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = EncodecModel(config)
    new.encoder = copy.deepcopy(model.encoder)
    new.quantizer = copy.deepcopy(model.quantizer)
    return new.to(next(model.parameters()).device)


def widen_decoder(model: EncodecModel, filters: int, *, init_scale: float = 1.0, seed: int = 0) -> EncodecModel:
    """A copy of ``model`` whose decoder has base width ``filters`` (more than it has), with the
    same encoder and codebooks (the same codes) and, up to float rounding, the same decoded audio.

    ``init_scale`` scales the new channels' random incoming weights relative to PyTorch's default
    initialization; ``seed`` makes them reproducible.
    """
    if not isinstance(model, EncodecModel):
        raise TypeError(f"widen_decoder expects an EncodecModel, got {type(model).__name__}")
    old_width = model.config.decoder_width
    if filters <= old_width:
        raise ValueError(f"the decoder already has {old_width} filters; widen it to more, not {filters}")
    if model.config.lstm or model.config.decoder_lstm_layers or model.config.norm not in ("weight_norm", "none"):
        raise ValueError(f"widen_decoder widens convolutions with weight norm or none, without an LSTM; this codec "
                         f"has lstm={model.config.lstm}, decoder LSTM layers {model.config.decoder_lstm_layers}, "
                         f"norm={model.config.norm!r} (add a decoder LSTM after widening)")
    wide = _same_codes(model, replace(model.config, decoder_filters=filters), seed)  # validates the width
    old_convs, new_convs = _convs(model.decoder), _convs(wide.decoder)
    if len(old_convs) != len(new_convs):
        raise ValueError("the two decoders have different layouts")  # same config but the width: cannot happen
    with torch.no_grad():
        for old, new in zip(old_convs, new_convs):
            w_old, w_new = _weight(old), _weight(new).clone() * init_scale
            transposed = isinstance(old, nn.ConvTranspose1d)
            in_old, out_old = (w_old.shape[0], w_old.shape[1]) if transposed else (w_old.shape[1], w_old.shape[0])
            if transposed:  # (in, out, kernel)
                w_new[:in_old, :out_old] = w_old
                w_new[in_old:, :out_old] = 0  # new inputs never reach old outputs
            else:  # (out, in, kernel)
                w_new[:out_old, :in_old] = w_old
                w_new[:out_old, in_old:] = 0
            _set_weight(new, w_new)
            if old.bias is not None:
                new.bias.data.zero_()
                new.bias.data[:out_old] = old.bias.detach()
    return wide.train(model.training)


def add_decoder_lstm(model: EncodecModel, layers: int = 2, *, seed: int = 0) -> EncodecModel:
    """A copy of ``model`` with a ``layers``-deep LSTM (EnCodec's, with its skip connection) after the
    decoder's first convolution, giving the decoder seconds of context, with the same encoder and
    codebooks and exactly the same decoded audio at the start.

    Why: a convolutional decoder renders each moment from a few frames of codes, but an instrument's
    timbre is a property of seconds; EnCodec's own decoder has this LSTM. How: the last LSTM layer's
    cell-candidate weights start at zero, so its cell, and so its output, stays exactly zero and
    the skip connection passes the convolution through; its other gates are live, so the zeroed
    weights get gradients from the first step. ``seed`` draws the new weights reproducibly.
    """
    if not isinstance(model, EncodecModel):
        raise TypeError(f"add_decoder_lstm expects an EncodecModel, got {type(model).__name__}")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"layers must be 1 or more, got {layers!r}")
    if model.config.decoder_lstm_layers:
        raise ValueError(f"this codec's decoder already has an LSTM ({model.config.decoder_lstm_layers} layers)")
    longer = _same_codes(model, replace(model.config, decoder_lstm=layers), seed)
    old = list(model.decoder.model)
    new = list(longer.decoder.model)
    lstm = new.pop(1)  # the decoder is [conv, LSTM, ...] with the LSTM, [conv, ...] without
    if len(old) != len(new):
        raise ValueError("the two decoders have different layouts")  # same config but the LSTM: cannot happen
    for source, target in zip(old, new):
        target.load_state_dict(source.state_dict())
    with torch.no_grad():
        hidden = lstm.lstm.hidden_size
        last = layers - 1
        for name in (f"weight_ih_l{last}", f"weight_hh_l{last}", f"bias_ih_l{last}", f"bias_hh_l{last}"):
            getattr(lstm.lstm, name)[2 * hidden:3 * hidden].zero_()  # PyTorch's gate order: i, f, g, o
    return longer.train(model.training)
