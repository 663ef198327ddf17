"""A small T5 text encoder made from a corpus' captions, for models trained from nothing.

    from conditioning.t5_builder import TextEncoderSpec, build_text_encoder
    from lm.token_cache import caption_texts
    build_text_encoder(caption_texts("corpus/"), "t5-captions", TextEncoderSpec(d_model=256))
    T5Conditioner.from_pretrained("t5-captions", output_dim=lm_dim)

Two steps, written into one T5 folder (the layout of a hub T5 folder, so
:meth:`T5Conditioner.from_pretrained`, transformers' ``T5EncoderModel``/``T5Tokenizer`` and the
plain ``sentencepiece`` package all load it offline):

1. a sentencepiece **unigram** vocabulary trained on the captions (``spiece.model``, and the
   same vocabulary as transformers' ``tokenizer.json``). Its special ids are T5's: pad 0, eos 1,
   unk 2, no bos. The conditioner relies on them: padding (id 0, mask 0) and the ``</s>`` the
   tokenizer appends. There are no ``<extra_id_N>`` sentinels (``extra_ids=0``): they serve only
   T5's span-corruption pre-training, so the T5 vocabulary is exactly the sentencepiece one.
   ``vocab_size`` is an upper bound: a small caption corpus may support fewer pieces (the
   vocabulary is then as large as sentencepiece finds useful). Text is case-folded by default
   (sentencepiece's ``nmt_nfkc_cf`` rule, which the tokenizer files carry): a small corpus
   rarely has enough of both cases for them to mean something different.
2. a randomly initialised ``T5EncoderModel`` (transformers' T5 initialisation, seeded) of the
   given width and depth, meant to be trained jointly with the LM
   (``tokenwave finetune --t5 FOLDER --train-text-encoder``).

The builder takes caption texts; the LM side reads them from a corpus or a token cache
(:func:`lm.token_cache.caption_texts`: each item's description and its metadata fields merged as
the training captions merge them, so the words that caption augmentation brings in are in the
vocabulary too).
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from codec.files import atomic_write

from .text import SPIECE_NAME, quiet_transformers

FEED_FORWARD = ("relu", "gated-gelu")
# T5's special ids; the conditioner's padding mask and the appended </s> depend on them.
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


@dataclass(frozen=True)
class TextEncoderSpec:
    """Sizes of the vocabulary and of the T5 encoder.

    ``d_kv`` defaults to ``d_model // num_heads`` and ``d_ff`` to ``4 * d_model`` (t5-small/base
    proportions); ``feed_forward_proj`` "relu" (T5 1.0) or "gated-gelu" (T5 1.1, flan-t5: a third
    matrix per block). ``dropout`` is T5's ``dropout_rate`` (active while training only).
    """

    vocab_size: int = 1000
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    d_kv: int | None = None
    d_ff: int | None = None
    feed_forward_proj: str = "relu"
    dropout: float = 0.1
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    case_sensitive: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.d_kv is None and self.num_heads > 0 and self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of num_heads ({self.num_heads}), "
                             f"or give d_kv")
        object.__setattr__(self, "d_kv", self.d_kv or (self.d_model // max(self.num_heads, 1)))
        object.__setattr__(self, "d_ff", self.d_ff or 4 * self.d_model)
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_kv", "d_ff",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, found {getattr(self, name)}")
        if self.vocab_size < 8:
            raise ValueError(f"vocab_size must be >= 8 (3 special ids and the characters), "
                             f"found {self.vocab_size}")
        if self.feed_forward_proj not in FEED_FORWARD:
            raise ValueError(f"feed_forward_proj must be one of {FEED_FORWARD}, "
                             f"found {self.feed_forward_proj!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), found {self.dropout}")

    def t5_config(self, vocab_size: int):
        """transformers' ``T5Config`` for an encoder over ``vocab_size`` tokens."""
        from transformers import T5Config

        return T5Config(vocab_size=vocab_size, d_model=self.d_model, d_kv=self.d_kv, d_ff=self.d_ff,
                        num_layers=self.num_layers, num_heads=self.num_heads,
                        relative_attention_num_buckets=self.relative_attention_num_buckets,
                        relative_attention_max_distance=self.relative_attention_max_distance,
                        dropout_rate=self.dropout, feed_forward_proj=self.feed_forward_proj,
                        pad_token_id=PAD_ID, eos_token_id=EOS_ID, decoder_start_token_id=PAD_ID)


class TextEncoderBuild(NamedTuple):
    """What :func:`build_text_encoder` wrote: the folder, the vocabulary size (sentencepiece
    pieces, specials included), the encoder's parameter count and the folder's size in bytes."""

    folder: Path
    vocab_size: int
    num_parameters: int
    num_bytes: int


# -- the vocabulary --------------------------------------------------------------------------------
def train_sentencepiece(texts: Iterable[str], *, vocab_size: int, case_sensitive: bool = False) -> bytes:
    """A unigram sentencepiece model trained on ``texts`` (the bytes of ``spiece.model``).

    T5's special ids (pad 0, eos 1, unk 2, no bos); every character of the texts is covered;
    ``vocab_size`` is an upper bound (see the module docstring). Deterministic: the same texts
    give the same bytes.
    """
    import sentencepiece as spm

    lines = [" ".join(t.split()) for t in texts]
    lines = [t for t in lines if t]
    if not lines:
        raise ValueError("expected at least one non-empty caption to build the vocabulary from, found none")
    buffer = io.BytesIO()
    spm.set_random_generator_seed(0)  # sampling of very large inputs (over input_sentence_size lines)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buffer, vocab_size=vocab_size, hard_vocab_limit=False,
            model_type="unigram", character_coverage=1.0,
            normalization_rule_name="nmt_nfkc" if case_sensitive else "nmt_nfkc_cf",
            pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
            input_sentence_size=2_000_000, shuffle_input_sentence=True, num_threads=1, minloglevel=2)
    except RuntimeError as error:  # e.g. more distinct characters than vocab_size
        message = " ".join(str(error).split()).split("] ")[-1]
        raise ValueError(f"sentencepiece could not build a {vocab_size}-piece vocabulary from {len(lines)} "
                         f"caption(s): {message}") from None
    return buffer.getvalue()


# -- the folder ----------------------------------------------------------------------------------
def _write(folder: Path, texts: Sequence[str], spec: TextEncoderSpec) -> tuple[int, int]:
    from transformers import T5EncoderModel, T5Tokenizer

    (folder / SPIECE_NAME).write_bytes(train_sentencepiece(texts, vocab_size=spec.vocab_size,
                                                           case_sensitive=spec.case_sensitive))
    tokenizer = T5Tokenizer.from_pretrained(str(folder), extra_ids=0)
    ids = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    if ids != (PAD_ID, EOS_ID, UNK_ID):  # T5Tokenizer's own layout: a change there must not go unseen
        raise RuntimeError(f"the T5 tokenizer gives pad/eos/unk ids {ids}, "
                           f"expected {(PAD_ID, EOS_ID, UNK_ID)}")
    tokenizer.save_pretrained(str(folder))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        encoder = T5EncoderModel(spec.t5_config(len(tokenizer)))
    with quiet_transformers():
        encoder.save_pretrained(str(folder))
    return len(tokenizer), sum(p.numel() for p in encoder.parameters())


def build_text_encoder(texts: Sequence[str], out: str | os.PathLike,
                       spec: TextEncoderSpec = TextEncoderSpec(), *,
                       overwrite: bool = False) -> TextEncoderBuild:
    """Train the vocabulary on ``texts``, build a random T5 encoder, write both to ``out``
    (atomically; a non-empty ``out`` is replaced only with ``overwrite``)."""
    sizes: list[int] = []
    folder = atomic_write(Path(out), lambda tmp: sizes.extend(_write(tmp, texts, spec)), folder=True,
                          overwrite=overwrite)
    num_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return TextEncoderBuild(folder, sizes[0], sizes[1], num_bytes)


__all__ = ["TextEncoderBuild", "TextEncoderSpec", "build_text_encoder", "train_sentencepiece"]
