"""Conditioning for the LM: text (T5, lookup table), melody chroma, the fuser, and condition dropout.

A batch of attributes (name -> one value per sample, None = null) goes through the
``ConditionProvider`` to ``Condition(embeddings (B, S, D), mask (B, S))`` per attribute, then
the ``ConditionFuser`` routes them into the LM input (prepend / sum) or its cross-attention.
"""
from .base import Condition, ConditionProvider, concat_batches, null_condition
from .dropout import AttributeDropout, ClassifierFreeGuidanceDropout, drop_words
from .fuser import FUSER_PRESETS, ConditionFuser, FusedInput, FuserConfig
from .instrument import InstrumentConditioner, instrument_vocabulary, parse_instrument
from .musical import (BeatConditioner, KeyConditioner, caption_attributes, parse_key, parse_tempo,
                      summed_input)
from .melody import ChromaConditioner, ChromaConfig, ChromaExtractor, MelodyBatch, chroma_filter_bank
from .text import LUTConditioner, T5Conditioner, TextTokens, WordTokenizer

__all__ = [
    "AttributeDropout", "BeatConditioner", "ChromaConditioner", "ChromaConfig", "ChromaExtractor",
    "ClassifierFreeGuidanceDropout", "Condition", "ConditionFuser", "ConditionProvider",
    "FUSER_PRESETS", "FusedInput", "FuserConfig", "InstrumentConditioner", "KeyConditioner", "LUTConditioner",
    "MelodyBatch", "T5Conditioner", "TextTokens", "WordTokenizer", "caption_attributes", "chroma_filter_bank",
    "concat_batches", "drop_words", "instrument_vocabulary", "null_condition", "parse_instrument", "parse_key",
    "parse_tempo", "summed_input",
]
