"""One config mixin: every config dataclass gets ``to_dict``/``from_dict`` from
:class:`codec.config.DictConfig`, round-trips through JSON, and writes what existing files hold.

The checks on the source are static (ast), like tests/test_architecture.py: a class added later
with its own ``to_dict`` fails here, and so does a new ``DictConfig`` class without a sample."""
from __future__ import annotations

import ast
import json
from dataclasses import is_dataclass
from pathlib import Path

import pytest

from codec.config import PRESETS as CODEC_PRESETS
from codec.config import DictConfig, EncodecConfig
from inference.config import AUDIOGEN_CONFIG, GeneratorConfig
from lm.corpus import TrackMeta
from lm.lora import LoRAConfig
from lm.model import PRESETS as LM_PRESETS
from lm.model import LMConfig
from lm.quant import QuantConfig
from lm.run import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("codec", "conditioning", "lm", "inference", "demos")
SHIPPED = ROOT / "assets" / "models" / "tokenwave-small"
SOURCES = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]

# One instance per config class, with tuples and None where the class has them.
SAMPLES: dict[type, object] = {
    EncodecConfig: CODEC_PRESETS["encodec_48khz"],
    LMConfig: LM_PRESETS["musicgen_stereo_small"],
    GeneratorConfig: AUDIOGEN_CONFIG,
    QuantConfig: QuantConfig.parse("int4-g64"),
    FinetuneConfig: FinetuneConfig(data="cache", out="run", model="tokenwave-small", betas=(0.8, 0.9),
                                   sample_prompts=("a", "b")),
    TrackMeta: TrackMeta(description="calm piano", moods=("happy", "calm"), bpm=90.0),
    LoRAConfig: LoRAConfig(rank=4, alpha=8.0),
}


def _is_dataclass_decorator(node: ast.expr) -> bool:
    target = node.func if isinstance(node, ast.Call) else node
    return (isinstance(target, ast.Name) and target.id == "dataclass") or \
        (isinstance(target, ast.Attribute) and target.attr == "dataclass")


def _classes(path: Path) -> list[ast.ClassDef]:
    return [n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.ClassDef)]


def test_no_dataclass_outside_codec_config_writes_its_own_to_dict():
    offenders = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name}.{item.name}"
                 for path in SOURCES if path != ROOT / "codec" / "config.py"
                 for node in _classes(path) if any(map(_is_dataclass_decorator, node.decorator_list))
                 for item in node.body
                 if isinstance(item, ast.FunctionDef) and item.name in ("to_dict", "from_dict")]
    assert not offenders, "use codec.config.DictConfig instead: " + ", ".join(offenders)


def test_every_config_class_has_a_sample():
    users = {node.name for path in SOURCES for node in _classes(path)
             if any(isinstance(b, ast.Name) and b.id == "DictConfig" for b in node.bases)}
    assert users == {cls.__name__ for cls in SAMPLES}
    assert all(issubclass(cls, DictConfig) and is_dataclass(cls) for cls in SAMPLES)


@pytest.mark.parametrize("cls", list(SAMPLES), ids=lambda cls: cls.__name__)
def test_round_trip_through_json(cls):
    sample = SAMPLES[cls]
    text = json.dumps(sample.to_dict())
    again = cls.from_dict(json.loads(text))
    assert again == sample and json.dumps(again.to_dict()) == text


@pytest.mark.parametrize("cls", [c for c in SAMPLES if c is not TrackMeta], ids=lambda cls: cls.__name__)
def test_unknown_fields_are_refused_by_name(cls):
    data = {**SAMPLES[cls].to_dict(), "bogus_field": 1}
    with pytest.raises(ValueError, match=rf"unknown {cls.__name__} fields \['bogus_field'\]; expected"):
        cls.from_dict(data)


def test_the_shipped_model_configs_serialize_byte_identically():
    stored = json.loads((SHIPPED / "config.json").read_text(encoding="utf-8"))
    for key, cls in (("lm", LMConfig), ("generator", GeneratorConfig)):
        assert json.dumps(cls.from_dict(stored[key]).to_dict()) == json.dumps(stored[key]), key
    codec = json.loads((SHIPPED / "codec" / "config.json").read_text(encoding="utf-8"))
    fields = {k: v for k, v in codec.items() if not k.startswith("format")}
    assert json.dumps(EncodecConfig.from_dict(fields).to_dict()) == json.dumps(fields)


def test_stored_forms_that_differ_are_kept():
    # Codec training checkpoints pickle the codec config and compare it on resume: tuples stay.
    assert isinstance(EncodecConfig().to_dict()["ratios"], tuple)
    assert isinstance(LMConfig(delays=(0, 1, 2, 3)).to_dict()["delays"], list)
    # Caption metadata: absent fields left out, user-written values normalized, unknown ignored.
    assert TrackMeta(description="x").to_dict() == {"description": "x"}
    meta = TrackMeta.from_dict({"genre": "Jazz", "moods": "Happy, calm", "bpm": "fast", "rating": 5})
    assert meta == TrackMeta(genre="jazz", moods=("happy", "calm"))
    # Missing fields take their defaults.
    assert QuantConfig.from_dict({"dtype": "int8"}) == QuantConfig("int8")
