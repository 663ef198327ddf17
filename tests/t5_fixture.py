"""Build a tiny random T5 folder offline, laid out like a hub T5 folder (spiece.model + config + weights).

The sentencepiece model is trained in a few milliseconds on ``CAPTIONS``; the T5 tokenizer adds
its 100 ``<extra_id_N>`` tokens on top, so the T5 vocabulary is ``len(tokenizer)``.

    from t5_fixture import build_tiny_t5
    folder = build_tiny_t5(tmp_path / "t5")

or, in a test module, ``from t5_fixture import tiny_t5_folder`` to get a session-scoped
pytest fixture.
"""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

CAPTIONS = (
    "happy rock song with electric guitar and drums",
    "calm piano melody at night",
    "80s pop track with bassy drums and synth",
    "lofi hip hop beat with a mellow piano",
    "an orchestral piece with strings and brass",
    "a jazz trio playing a slow ballad",
    "upbeat electronic dance music with a heavy bass line",
    "acoustic folk guitar with soft vocals",
)


def train_spiece(path: Path, *, vocab_size: int = 64) -> Path:
    """Train a unigram sentencepiece model with T5's special ids (pad 0, eos 1, unk 2, no bos)."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CAPTIONS * 4), model_writer=buffer, vocab_size=vocab_size,
        hard_vocab_limit=False, model_type="unigram", character_coverage=1.0,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, minloglevel=2)
    path.write_bytes(buffer.getvalue())
    return path


def build_tiny_t5(folder: str | Path, *, d_model: int = 24, num_layers: int = 2, num_heads: int = 3,
                  d_kv: int = 8, d_ff: int = 48, feed_forward_proj: str = "relu", seed: int = 0) -> Path:
    """Write spiece.model, config.json and random T5 encoder weights into ``folder``; return it.

    ``feed_forward_proj="gated-gelu"`` gives the flan-t5 block layout.
    """
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train_spiece(folder / "spiece.model")
    tokenizer = T5Tokenizer.from_pretrained(str(folder))
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_kv, d_ff=d_ff,
                      num_layers=num_layers, num_heads=num_heads, relative_attention_num_buckets=8,
                      relative_attention_max_distance=16, dropout_rate=0.0,
                      feed_forward_proj=feed_forward_proj, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)
    torch.manual_seed(seed)
    T5EncoderModel(config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_t5_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide tiny T5 folder (d_model 24)."""
    return build_tiny_t5(tmp_path_factory.mktemp("tiny_t5"))
