"""Text conditioners: T5 through transformers, and a lookup table for tests and tiny models.

Both map a batch of texts to ``Condition(embeddings (B, S, D), mask (B, S))`` with padded and
null positions zeroed after ``output_proj``, as audiocraft's conditioners do. The only weights
an LM checkpoint holds for them are ``output_proj.weight|bias`` (and ``embed.weight`` for the
lookup table); T5 itself comes from a local transformers folder (a released T5, or one built
from a corpus' captions by :mod:`conditioning.t5_builder`), and a trained one is written back as
such a folder by :meth:`T5Conditioner.save_pretrained`.

Null text. audiocraft turns ``None`` into "" and zeroes the mask of every "" row, so an empty
description *is* the null condition. transformers' MusicGen has no null text: "" is tokenized
to a lone ``</s>`` and encoded like any prompt, and its guidance branch is built from zeros of
the T5 hidden states with a zero attention mask, which ``enc_to_dec_proj`` + masking turn into
zeros. Both reach the same unconditional branch (zeros, mask 0: ``base.null_condition``); they
differ only for "" given as a prompt. ``empty_is_null`` selects the behaviour: True for
audiocraft checkpoints, False for transformers folders. ``None`` is null in both. Generation
never hands a conditioner "" (``inference.prompts.condition_texts`` makes a prompt's "" None for
every model), so ``empty_is_null`` decides only texts given here directly: training captions,
word dropout's all-dropped "" (inside :meth:`T5Conditioner.tokenize`) and direct calls.

Long texts. The encoder's cost grows with the square of the text's length (a 20,000-word prompt
took 23 GB), so a conditioner reads at most ``max_tokens`` tokens of a text, with a warning:
the tokenizer's ``model_max_length`` when it states one (512 for the released T5s), else
:data:`MAX_TEXT_TOKENS` (T5's training length). Texts are first cut to
``CHARS_PER_TOKEN * max_tokens`` characters so that tokenizing stays bounded too. The API, the
CLI and the demo all go through here.
"""
from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .base import Condition
from .dropout import drop_words

TextBatch = str | Sequence[str | None]
MAX_TEXT_TOKENS = 512  # T5's training length: what a text encoder reads when its tokenizer states no limit
CHARS_PER_TOKEN = 16  # texts are cut to this many characters per token before tokenizing
_NO_LIMIT = 1_000_000  # transformers states "no limit" as model_max_length = 1e30


def tokenizer_limit(tokenizer: object) -> int:
    """The most tokens a text encoder reads: the tokenizer's ``model_max_length`` when it states
    a real one, else :data:`MAX_TEXT_TOKENS`."""
    stated = getattr(tokenizer, "model_max_length", None)
    if isinstance(stated, int) and 0 < stated < _NO_LIMIT:
        return stated
    return MAX_TEXT_TOKENS


def cut_characters(texts: list[str | None], max_tokens: int) -> tuple[list[str | None], list[int]]:
    """Texts cut to ``CHARS_PER_TOKEN * max_tokens`` characters (far more than ``max_tokens``
    tokens of any real text), and the indices of those that were cut."""
    limit = CHARS_PER_TOKEN * max_tokens
    cut = [i for i, t in enumerate(texts) if t is not None and len(t) > limit]
    return [t[:limit] if i in cut else t for i, t in enumerate(texts)], cut


def warn_truncated(indices: Sequence[int], max_tokens: int) -> None:
    """One warning naming the texts the encoder reads only the beginning of."""
    if indices:
        which = ", ".join(str(i) for i in sorted(set(indices)))
        warnings.warn(f"text prompt(s) {which} too long: the text encoder reads the first {max_tokens} "
                      f"tokens of a prompt; the rest is ignored", stacklevel=4)


def as_text_batch(texts: TextBatch) -> list[str | None]:
    """A list with one entry per prompt. A single string is one prompt, never its characters."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Sequence):
        raise TypeError(f"expected a string or a sequence of strings/None, found {type(texts).__name__}")
    batch = list(texts)
    if not batch:
        raise ValueError("expected at least one text, found an empty sequence")
    for i, text in enumerate(batch):
        if text is not None and not isinstance(text, str):
            raise TypeError(f"text {i} must be a string or None, found {type(text).__name__}")
    return batch


class TextTokens(NamedTuple):
    """Tokenized texts.

    input_ids: (B, S) long, padded to the longest text of the batch.
    attention_mask: (B, S) long, what the text encoder attends to (1 = token, 0 = padding).
    mask: (B, S) long, the condition mask: ``attention_mask`` with null rows set to 0.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask: torch.Tensor


def _projection(dim: int, output_dim: int | None) -> nn.Module | None:
    return None if output_dim is None else nn.Linear(dim, output_dim)


SPIECE_NAME = "spiece.model"


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No per-file "Loading weights" / "Writing model shards" bars from transformers (small files)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def read_spiece(folder: str | os.PathLike) -> bytes | None:
    """The sentencepiece model of a T5 folder (``spiece.model``), or None when it has only
    ``tokenizer.json``. Kept in memory so that saving does not depend on the source folder."""
    path = Path(folder) / SPIECE_NAME
    return path.read_bytes() if path.is_file() else None


def _unique_tensors(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """``state`` with each shared tensor once (T5's tied ``shared`` / ``embed_tokens``: the first
    name wins and transformers re-ties on load), cast to ``dtype`` when given."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for name, tensor in state.items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if identity in seen:
            continue
        seen.add(identity)
        tensor = tensor.detach().to("cpu")
        out[name] = (tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor).contiguous()
    return out


class T5Conditioner(nn.Module):
    """T5 encoder + ``output_proj`` (t5 dim -> LM dim).

    Frozen by default: the encoder is then kept outside the module tree, so it is not in
    ``state_dict()`` (an audiocraft LM checkpoint has only ``output_proj``), not in
    ``parameters()`` (an optimizer never sees it), and stays in eval mode; ``.to(device)``
    still moves it, but casts leave its dtype alone (its output is cast to ``output_proj``'s).
    With ``finetune=True`` it is the submodule ``t5`` and follows the module in everything.

    ``set_finetune`` switches between the two after construction (joint training of a T5 built
    from captions: ``tokenwave finetune --train-text-encoder``).

    ``output_dim=None`` drops the projection (transformers omits ``enc_to_dec_proj`` when the
    T5 and decoder widths match). ``word_dropout`` acts in training mode only; MusicGen trains
    with 0.3 (melody: 0.2). ``spiece_model`` (the bytes of ``spiece.model``) is written back by
    ``save_pretrained``, so a saved folder carries the sentencepiece model whatever became of
    the folder the tokenizer was loaded from. ``max_tokens`` (default: the tokenizer's stated
    limit, else 512) caps what the encoder reads of a text, with a warning.
    """

    def __init__(self, *, encoder: nn.Module, tokenizer: Callable[..., Any], output_dim: int | None,
                 finetune: bool = False, word_dropout: float = 0.0, empty_is_null: bool = True,
                 seed: int = 1234, spiece_model: bytes | None = None, max_tokens: int | None = None) -> None:
        super().__init__()
        if not 0.0 <= word_dropout <= 1.0:
            raise ValueError(f"word_dropout must be in [0, 1], found {word_dropout}")
        if max_tokens is not None and max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2 (a token and </s>), found {max_tokens}")
        self.max_tokens = tokenizer_limit(tokenizer) if max_tokens is None else max_tokens
        self.dim = int(encoder.config.d_model)
        self.output_dim = self.dim if output_dim is None else output_dim
        self.word_dropout = word_dropout
        self.empty_is_null = empty_is_null
        self.tokenizer = tokenizer
        self.spiece_model = spiece_model
        self.generator = torch.Generator().manual_seed(seed)
        self.finetune = False
        object.__setattr__(self, "_frozen_t5", encoder)
        self.set_finetune(finetune)
        self.output_proj = _projection(self.dim, output_dim)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, output_dim: int | None,
                        finetune: bool = False, word_dropout: float = 0.0, empty_is_null: bool = True,
                        seed: int = 1234, dtype: torch.dtype | None = None,
                        max_tokens: int | None = None) -> T5Conditioner:
        """Load tokenizer and encoder from a local T5 folder (t5-small ... t5-3b, flan-t5-*).

        The folder needs ``config.json``, the weights, and ``spiece.model`` or ``tokenizer.json``.
        A full seq2seq T5 checkpoint works too: only the encoder is kept.
        """
        from transformers import T5EncoderModel, T5Tokenizer

        path = Path(folder)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: expected a T5 folder with config.json, found none")
        if not ((path / "spiece.model").is_file() or (path / "tokenizer.json").is_file()):
            raise FileNotFoundError(f"{path}: expected spiece.model or tokenizer.json for the T5 tokenizer")
        # T5Tokenizer(vocab_file=...) silently ignores the file in transformers 5: load the folder.
        tokenizer = T5Tokenizer.from_pretrained(str(path))
        kwargs = {} if dtype is None else {"dtype": dtype}
        with quiet_transformers():
            encoder = T5EncoderModel.from_pretrained(str(path), **kwargs)
        return cls(encoder=encoder, tokenizer=tokenizer, output_dim=output_dim, finetune=finetune,
                   word_dropout=word_dropout, empty_is_null=empty_is_null, seed=seed,
                   spiece_model=read_spiece(path), max_tokens=max_tokens)

    def save_pretrained(self, folder: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
        """Write the encoder and tokenizer as a transformers T5 folder that ``from_pretrained``
        (and transformers' ``T5EncoderModel`` / ``T5Tokenizer``) load offline: ``config.json``,
        ``model.safetensors`` (in ``dtype`` when given, e.g. bfloat16 to halve it; the config keeps
        the encoder's own dtype, which loaders use), ``tokenizer.json``, ``tokenizer_config.json``
        and ``spiece.model``. ``output_proj`` is not written: it belongs to the LM checkpoint."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        encoder = self.encoder
        with quiet_transformers():
            encoder.save_pretrained(str(folder), state_dict=_unique_tensors(encoder.state_dict(), dtype))
        self.tokenizer.save_pretrained(str(folder))
        spiece = self.spiece_model
        if spiece is None:  # a tokenizer built elsewhere: its file, if it still exists
            vocab = getattr(self.tokenizer, "vocab_file", None)
            spiece = Path(vocab).read_bytes() if vocab and Path(vocab).is_file() else None
        if spiece is not None:
            (folder / SPIECE_NAME).write_bytes(spiece)
        return folder

    @property
    def encoder(self) -> nn.Module:
        return self.t5 if self.finetune else self._frozen_t5

    def set_finetune(self, enabled: bool) -> T5Conditioner:
        """Train the encoder with the rest of the model (True: a submodule ``t5``, in
        ``parameters()`` and ``state_dict()``, following ``train()``/``eval()``) or freeze it
        (False: outside the module tree, eval mode, no gradients). Returns self."""
        encoder = self.encoder
        if enabled:
            object.__setattr__(self, "_frozen_t5", None)
            self.finetune = True
            self.t5 = encoder.requires_grad_(True).train(self.training)
        else:
            if "t5" in self._modules:
                del self._modules["t5"]
            self.finetune = False
            object.__setattr__(self, "_frozen_t5", encoder.eval().requires_grad_(False))
        return self

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - torch's signature
        super()._apply(fn, recurse)
        if not self.finetune:
            # Follow device moves only: the frozen T5 keeps the dtype it was loaded with
            # (``from_pretrained(dtype=...)``), as T5 is prone to overflow in float16.
            probe = fn(torch.zeros((), device=self.device))
            self._frozen_t5.to(probe.device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def tokenize(self, texts: TextBatch) -> TextTokens:
        """texts: B prompts (None = null). Word dropout applies in training mode only."""
        entries, cut = cut_characters(as_text_batch(texts), self.max_tokens)
        if self.training and self.word_dropout > 0:
            entries = drop_words(entries, self.word_dropout, self.generator)
        null = [t is None or (self.empty_is_null and t == "") for t in entries]
        # The encoder sees the tokenizer's mask even on null rows (audiocraft hands it an all-zero
        # one); those rows are zeroed after the projection either way.
        encoded = self._encode([t or "" for t in entries], cut)
        attention_mask = encoded["attention_mask"].long()
        keep = torch.tensor([not n for n in null], dtype=torch.long)[:, None]
        device = self.device
        return TextTokens(encoded["input_ids"].to(device), attention_mask.to(device),
                          (attention_mask * keep).to(device))

    def _encode(self, texts: list[str], cut: list[int]) -> Any:
        """The tokenizer's padded batch, each text at most ``max_tokens`` tokens (its ``</s>`` kept).

        One call asks for a token more than the cap: a row that reaches it was longer, and only
        then is the batch tokenized again at the cap, with a warning.
        """
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_tokens + 1)
        lengths = encoded["attention_mask"].sum(dim=-1)
        over = cut + [i for i, n in enumerate(lengths.tolist()) if n > self.max_tokens]
        if over:
            warn_truncated(over, self.max_tokens)
            if int(lengths.max()) > self.max_tokens:
                encoded = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                         max_length=self.max_tokens)
        return encoded

    def forward(self, tokens: TextTokens) -> Condition:
        """tokens from ``tokenize`` -> Condition((B, S, output_dim), (B, S))."""
        with torch.set_grad_enabled(self.finetune and torch.is_grad_enabled()):
            hidden = self.encoder(input_ids=tokens.input_ids,
                                  attention_mask=tokens.attention_mask).last_hidden_state
        if self.output_proj is not None:
            hidden = self.output_proj(hidden.to(self.output_proj.weight.dtype))
        return Condition(hidden * tokens.mask[..., None].to(hidden.dtype), tokens.mask)

    def encode(self, texts: TextBatch) -> Condition:
        """tokenize + forward."""
        return self(self.tokenize(texts))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, output_dim={self.output_dim}, finetune={self.finetune}, "
                f"word_dropout={self.word_dropout}, empty_is_null={self.empty_is_null}, "
                f"max_tokens={self.max_tokens}")


_EDGE_PUNCTUATION = "?:!.,;\"'()"


class WordTokenizer:
    """Word-level tokenizer over a fixed vocabulary.

    Id 0 is padding, 1 an unknown word, vocabulary words start at 2. Words are lower-cased,
    split on whitespace and stripped of edge punctuation; with ``split_words=False`` the whole
    text is one entry (for global attributes such as a genre). None or "" -> one padding
    position with mask 0 (the null condition).
    """

    pad_id = 0
    unknown_id = 1

    def __init__(self, vocab: Sequence[str], *, split_words: bool = True) -> None:
        normalized = [self._normalize(w) for w in vocab]
        if len(set(normalized)) != len(normalized) or "" in normalized:
            raise ValueError("vocabulary entries must be distinct and non-empty after normalization")
        self.split_words = split_words
        self.index = {w: i + 2 for i, w in enumerate(normalized)}

    def __len__(self) -> int:
        return len(self.index) + 2

    @staticmethod
    def _normalize(word: str) -> str:
        return word.strip().strip(_EDGE_PUNCTUATION).lower()

    def _words(self, text: str) -> list[str]:
        if not self.split_words:
            word = self._normalize(text)
            return [word] if word else []
        return [w for w in (self._normalize(p) for p in re.split(r"\s+", text)) if w]

    def __call__(self, texts: TextBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """texts: B entries -> (ids (B, S) long, mask (B, S) long), S = longest text (>= 1)."""
        rows = [[self.index.get(w, self.unknown_id) for w in self._words(t)] if t else []
                for t in as_text_batch(texts)]
        length = max(1, max(len(r) for r in rows))
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        return ids, mask


class LUTConditioner(nn.Module):
    """Lookup-table text conditioner: word ids -> ``embed`` (dim) -> ``output_proj`` (output_dim).

    State-dict names follow audiocraft's LUTConditioner: ``embed.weight``, ``output_proj.*``.
    A text's first ``max_tokens`` words are read (a warning names longer texts).
    """

    def __init__(self, *, vocab: Sequence[str], dim: int, output_dim: int, split_words: bool = True,
                 max_tokens: int = MAX_TEXT_TOKENS) -> None:
        super().__init__()
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, found {max_tokens}")
        self.max_tokens = max_tokens
        self.tokenizer = WordTokenizer(vocab, split_words=split_words)
        self.dim = dim
        self.output_dim = output_dim
        self.embed = nn.Embedding(len(self.tokenizer), dim)
        self.output_proj = nn.Linear(dim, output_dim)

    def tokenize(self, texts: TextBatch) -> TextTokens:
        """At most ``max_tokens`` words of each text (a warning names the longer ones)."""
        entries, cut = cut_characters(as_text_batch(texts), self.max_tokens)
        ids, mask = self.tokenizer(entries)
        over = cut + [i for i, n in enumerate(mask.sum(dim=-1).tolist()) if n > self.max_tokens]
        if over:
            warn_truncated(over, self.max_tokens)
            ids, mask = ids[:, :self.max_tokens], mask[:, :self.max_tokens]
        device = self.embed.weight.device
        return TextTokens(ids.to(device), mask.to(device), mask.to(device))

    def forward(self, tokens: TextTokens) -> Condition:
        """tokens -> Condition((B, S, output_dim), (B, S))."""
        embeds = self.output_proj(self.embed(tokens.input_ids))
        return Condition(embeds * tokens.mask[..., None].to(embeds.dtype), tokens.mask)

    def encode(self, texts: TextBatch) -> Condition:
        return self(self.tokenize(texts))
