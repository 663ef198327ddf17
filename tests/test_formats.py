"""Checkpoint formats: every writer/reader round trip, detection, config inference, bad files."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from codec import PRESETS, EncodecConfig, EncodecModel
from codec import formats, registry
from codec.formats import CheckpointError, detect_format, load_model, read_checkpoint, save_model

TINY = EncodecConfig(name="tiny", n_filters=4, dimension=8, num_codebooks=3, codebook_size=16,
                     target_bandwidths=(0.3, 0.9))  # 4 bits * 75 Hz = 0.3 kbps per codebook
TINY_48K = replace(PRESETS["encodec_48khz"], name="tiny48", n_filters=2, dimension=8,
                   num_codebooks=2, codebook_size=8, target_bandwidths=(0.45, 0.9))
TINY_32K = replace(PRESETS["encodec_32khz"], name="tiny32", n_filters=4, dimension=8,
                   num_codebooks=2, codebook_size=16, target_bandwidths=(0.4,))


def random_model(config: EncodecConfig, seed: int = 0) -> EncodecModel:
    """Random weights, codebooks included (zeros would make every code 0)."""
    torch.manual_seed(seed)
    model = EncodecModel(config)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith(("embed", "embed_avg", "cluster_size")) or ".norm." in name:
                tensor.normal_()
            elif name.endswith("inited"):
                tensor.fill_(1.0)
    return model.eval()


def assert_same_state(found: dict, expected: dict) -> None:
    assert list(sorted(found)) == list(sorted(expected))
    for key, value in expected.items():
        assert found[key].dtype == value.dtype, key
        assert torch.equal(found[key], value), key


def target_for(tmp_path: Path, fmt: str) -> Path:
    return tmp_path / {"original": "model.th", "audiocraft": "compression_state_dict.bin"}.get(
        fmt, fmt)


# -- round trips ----------------------------------------------------------------------------
@pytest.mark.parametrize("config", [TINY, TINY_48K, TINY_32K], ids=lambda c: c.name)
@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_every_format_round_trips_the_state_dict(tmp_path, fmt, config):
    if fmt == "audiocraft" and config.segment is not None:
        pytest.skip("audiocraft has no chunked models (tested below)")
    model = random_model(config)
    written = save_model(model, target_for(tmp_path, fmt), format=fmt)
    assert detect_format(written) == fmt
    checkpoint = read_checkpoint(written, config=config if fmt == "original" else None)
    assert checkpoint.format == fmt
    assert_same_state(checkpoint.state, model.state_dict())
    expected = config
    if fmt == "transformers":  # transformers configs carry no name: the folder's is used
        expected = replace(config, name=written.name)
    assert checkpoint.config == expected


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_loaded_model_gives_the_same_codes_and_audio(tmp_path, fmt):
    model = random_model(TINY_32K)
    written = save_model(model, target_for(tmp_path, fmt), format=fmt)
    loaded = load_model(written, config=TINY_32K if fmt == "original" else None)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert not any(k.endswith("weight_g") for k in loaded.state_dict())  # weight norm folded
    wav = torch.randn(2, 1, 1000)
    with torch.no_grad():
        codes = model.encode_to_codes(wav)
        assert torch.equal(loaded.encode_to_codes(wav), codes)
        torch.testing.assert_close(loaded.decode(codes), model.decode(codes), rtol=0, atol=1e-6)


def test_load_for_training_keeps_weight_norm_and_casts(tmp_path):
    written = save_model(random_model(TINY), tmp_path / "m")
    model = load_model(written, inference=False, dtype=torch.float64)
    assert any(k.endswith("weight_g") for k in model.state_dict())
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_folded_model_round_trips_exactly_in_tokenwave_format(tmp_path):
    model = random_model(TINY).prepare_for_inference()
    written = save_model(model, tmp_path / "folded")
    assert_same_state(read_checkpoint(written).state, model.state_dict())
    loaded = load_model(written)
    assert_same_state(loaded.state_dict(), model.state_dict())


@pytest.mark.parametrize("fmt", ["original", "audiocraft", "transformers"])
def test_folded_model_is_unfolded_for_reference_formats(tmp_path, fmt):
    source = random_model(TINY)
    folded = random_model(TINY).prepare_for_inference()
    written = save_model(folded, target_for(tmp_path, fmt), format=fmt)
    state = read_checkpoint(written, config=TINY if fmt == "original" else None).state
    assert state.keys() == source.state_dict().keys()  # weight_g / weight_v again
    loaded = load_model(written, config=TINY if fmt == "original" else None)
    for key, value in folded.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=1e-6, atol=1e-7)


def test_audiocraft_writer_refuses_chunked_models(tmp_path):
    with pytest.raises(ValueError, match="chunks"):
        save_model(random_model(TINY_48K), tmp_path / "x.bin", format="audiocraft")


def test_transformers_writer_refuses_what_transformers_cannot_express(tmp_path):
    with pytest.raises(ValueError, match="codebook count"):
        save_model(random_model(replace(TINY, target_bandwidths=(0.3,))), tmp_path / "a",
                   format="transformers")
    with pytest.raises(ValueError, match="LSTM"):
        save_model(random_model(replace(TINY, lstm=0)), tmp_path / "b", format="transformers")


def test_save_does_not_overwrite_unless_asked_and_leaves_no_temporaries(tmp_path):
    first, second = random_model(TINY, seed=1), random_model(TINY, seed=2)
    for fmt in formats.FORMATS:
        target = target_for(tmp_path, fmt)
        save_model(first, target, format=fmt)
        with pytest.raises(FileExistsError):
            save_model(second, target, format=fmt)
        save_model(second, target, format=fmt, overwrite=True)
        state = read_checkpoint(target, config=TINY if fmt == "original" else None).state
        assert_same_state(state, second.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        target_for(tmp_path, f).name for f in formats.FORMATS)
    empty = tmp_path / "empty"
    empty.mkdir()
    save_model(first, empty)  # an empty folder is fine to fill
    assert (empty / "config.json").is_file()


def test_original_and_audiocraft_write_into_an_existing_folder(tmp_path):
    model = random_model(TINY)
    assert save_model(model, tmp_path, format="original") == tmp_path / "tiny.th"
    assert save_model(model, tmp_path, format="audiocraft") == \
        tmp_path / "compression_state_dict.bin"


def test_tokenwave_config_json_is_the_config_plus_a_marker(tmp_path):
    written = save_model(random_model(TINY), tmp_path / "m")
    data = json.loads((written / "config.json").read_text())
    assert data.pop("format") == "tokenwave-encodec" and data.pop("format_version") == 1
    assert EncodecConfig.from_dict(data) == TINY


def test_model_from_pretrained_and_save_pretrained_use_the_formats(tmp_path):
    model = random_model(TINY)
    model.save_pretrained(tmp_path / "m")
    assert detect_format(tmp_path / "m") == "tokenwave"
    loaded = EncodecModel.from_pretrained(tmp_path / "m", inference=False)
    assert_same_state(loaded.state_dict(), model.state_dict())


# -- detection of the surroundings ------------------------------------------------------------
def test_weights_file_inside_a_folder_reads_the_folder(tmp_path):
    written = save_model(random_model(TINY), tmp_path / "tf", format="transformers")
    assert read_checkpoint(written / "model.safetensors").format == "transformers"
    written = save_model(random_model(TINY), tmp_path / "tw")
    assert read_checkpoint(written / "model.safetensors").format == "tokenwave"


def test_folder_holding_one_checkpoint_file(tmp_path):
    model = random_model(TINY)
    save_model(model, tmp_path / "ac" / "compression_state_dict.bin", format="audiocraft")
    assert detect_format(tmp_path / "ac") == "audiocraft"
    assert read_checkpoint(tmp_path / "ac").format == "audiocraft"
    save_model(model, tmp_path / "th" / "weights.th", format="original")
    assert detect_format(tmp_path / "th") == "original"
    assert read_checkpoint(tmp_path / "th", config=TINY).format == "original"


def test_musicgen_transformers_folder_yields_its_audio_encoder(tmp_path):
    model = random_model(TINY_32K)
    codec = save_model(model, tmp_path / "codec", format="transformers")
    from safetensors.torch import load_file, save_file

    weights = {f"audio_encoder.{k}": v for k, v in load_file(codec / "model.safetensors").items()}
    weights["decoder.model.decoder.embed_tokens.0.weight"] = torch.zeros(3, 2)
    folder = tmp_path / "musicgen-tiny"
    folder.mkdir()
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": "musicgen", "decoder": {"model_type": "musicgen_decoder"},
              "audio_encoder": json.loads((codec / "config.json").read_text())}
    (folder / "config.json").write_text(json.dumps(config))
    checkpoint = read_checkpoint(folder)
    assert checkpoint.config == replace(TINY_32K, name="musicgen-tiny")
    assert_same_state(checkpoint.state, model.state_dict())


# -- bare state dicts: config from the name or the shapes -----------------------------------
def preset_state(name: str) -> dict[str, torch.Tensor]:
    """A full-size state dict for a preset, with random weights."""
    torch.manual_seed(0)
    return EncodecModel(PRESETS[name]).state_dict()


def sha8(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:8]


def test_release_file_name_gives_the_preset(tmp_path):
    state = preset_state("encodec_24khz")
    plain = tmp_path / "plain.th"
    torch.save(state, plain)
    release = tmp_path / f"encodec_24khz-{sha8(plain)}.th"
    plain.rename(release)
    checkpoint = read_checkpoint(release)
    assert checkpoint.format == "original" and checkpoint.config == PRESETS["encodec_24khz"]
    assert_same_state(checkpoint.state, state)


def test_checksum_in_the_file_name_is_verified(tmp_path):
    plain = tmp_path / "plain.th"
    save_model(random_model(TINY), plain, format="original")
    good = tmp_path / f"tiny-{sha8(plain)}.th"
    plain.rename(good)
    assert read_checkpoint(good, config=TINY).format == "original"
    wrong = tmp_path / "encodec_24khz-00000000.th"
    good.rename(wrong)
    with pytest.raises(CheckpointError, match="checksum mismatch") as error:
        read_checkpoint(wrong)
    message = str(error.value)
    assert str(wrong) in message and "00000000" in message and sha8(wrong) in message


def test_shapes_pick_the_preset_for_a_renamed_release_file(tmp_path):
    state = preset_state("encodec_48khz")
    torch.save(state, tmp_path / "my_codec.th")
    checkpoint = read_checkpoint(tmp_path / "my_codec.th")
    assert checkpoint.config == PRESETS["encodec_48khz"]


@pytest.mark.parametrize("changes", [
    {}, {"true_skip": True}, {"n_residual_layers": 2}, {"lstm": 0}, {"lstm": 1},
    {"norm": "time_group_norm", "causal": False}, {"norm": "none"}, {"compress": 4},
    {"ratios": (4, 3, 2)}, {"channels": 2, "kernel_size": 5, "last_kernel_size": 3},
    {"residual_kernel_size": 5},
], ids=str)
def test_architecture_inferred_from_shapes(tmp_path, changes):
    config = replace(TINY, **changes)
    torch.save(random_model(config).state_dict(), tmp_path / "x.th")
    checkpoint = read_checkpoint(tmp_path / "x.th", config=config)  # loads when config fits
    inferred = formats.original.infer_architecture(checkpoint.state, tmp_path / "x.th")
    assert inferred == {k: getattr(config, k) for k in inferred}


def test_bare_state_dict_without_a_matching_preset_asks_for_a_config(tmp_path):
    torch.save(random_model(TINY).state_dict(), tmp_path / "x.th")
    with pytest.raises(CheckpointError, match="config=") as error:
        read_checkpoint(tmp_path / "x.th")
    assert "n_filters=4" in str(error.value) and "x.th" in str(error.value)


def test_config_override_is_refused_for_files_that_carry_one(tmp_path):
    written = save_model(random_model(TINY), tmp_path / "m")
    with pytest.raises(CheckpointError, match="carries its own config"):
        read_checkpoint(written, config=TINY)


# -- audiocraft configs ---------------------------------------------------------------------
# The layout OmegaConf.to_yaml writes for audiocraft's encodec_musicgen_32khz solver config
# (model/encodec/default.yaml + encodec_large_nq4_s640.yaml), interpolations left unresolved.
AUDIOCRAFT_32K_YAML = """\
device: cuda
dtype: float32
sample_rate: 32000
channels: 1
solver: compression
compression_model: encodec
encodec:
  autoencoder: seanet
  quantizer: rvq
  sample_rate: ${sample_rate}
  channels: ${channels}
  causal: false
  renormalize: false
seanet:
  dimension: 128
  channels: ${channels}
  causal: ${encodec.causal}
  n_filters: 64
  n_residual_layers: 1
  ratios:
  - 8
  - 5
  - 4
  - 4
  activation: ELU
  activation_params:
    alpha: 1.0
  norm: weight_norm
  norm_params: {}
  kernel_size: 7
  residual_kernel_size: 3
  last_kernel_size: 7
  dilation_base: 2
  pad_mode: constant
  true_skip: true
  compress: 2
  lstm: 2
  disable_norm_outer_blocks: 0
  decoder:
    trim_right_ratio: 1.0
    final_activation: null
    final_activation_params: null
  encoder: {}
rvq:
  n_q: 4
  q_dropout: false
  bins: 2048
  decay: 0.99
  kmeans_init: true
  kmeans_iters: 50
  threshold_ema_dead_code: 2
  orthogonal_reg_weight: 0.0
  orthogonal_reg_active_codes_only: false
dset:
  path: ${dora.dir}/data
"""


def audiocraft_package(yaml_text: str, state: dict) -> dict:
    return {"best_state": state, "xp.cfg": yaml_text, "version": "1.3.0", "exported": True}


def test_audiocraft_yaml_with_interpolations_gives_the_32khz_preset(tmp_path):
    keys = formats.checkpoint.key_names(PRESETS["encodec_32khz"], tmp_path)
    state = {k: torch.zeros(0) for k in keys}  # shapes are checked after the config is read
    # the released model pads by reflection (see the preset); audiocraft's YAML says constant
    released = AUDIOCRAFT_32K_YAML.replace("pad_mode: constant", "pad_mode: reflect")
    torch.save(audiocraft_package(released, state), tmp_path / "c.bin")
    with pytest.raises(CheckpointError, match="shape mismatches") as error:
        read_checkpoint(tmp_path / "c.bin")
    assert "'encodec_32khz' config" in str(error.value)


def test_audiocraft_config_parsing_matches_the_preset():
    import yaml

    config = formats.audiocraft.audiocraft_config(yaml.safe_load(AUDIOCRAFT_32K_YAML), Path("c.bin"))
    assert config == replace(PRESETS["encodec_32khz"], name="c", pad_mode="constant")
    reflect = AUDIOCRAFT_32K_YAML.replace("pad_mode: constant", "pad_mode: reflect")
    config = formats.audiocraft.audiocraft_config(yaml.safe_load(reflect),
                                                  Path("x/compression_state_dict.bin"))
    assert config == PRESETS["encodec_32khz"]


@pytest.mark.parametrize("edit,match", [
    (("disable_norm_outer_blocks: 0", "disable_norm_outer_blocks: 1"), "unsupported"),
    (("activation: ELU", "activation: GELU"), "unsupported"),
    (("  encoder: {}", "  encoder:\n    n_filters: 32"), "different n_filters"),
    (("compression_model: encodec", "compression_model: dac"), "expected an EnCodec"),
    (("sample_rate: ${sample_rate}", "sample_rate: ${oc.env:SR}"), "cannot resolve"),
])
def test_audiocraft_configs_tokenwave_cannot_build_are_refused(tmp_path, edit, match):
    text = AUDIOCRAFT_32K_YAML.replace(*edit)
    assert text != AUDIOCRAFT_32K_YAML
    torch.save(audiocraft_package(text, {}), tmp_path / "c.bin")
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(tmp_path / "c.bin")


def test_audiocraft_lm_checkpoint_is_named_as_such(tmp_path):
    text = "lm_model: transformer_lm\ntransformer_lm:\n  dim: 16\n"
    torch.save(audiocraft_package(text, {}), tmp_path / "state_dict.bin")
    with pytest.raises(CheckpointError, match="LM checkpoint"):
        read_checkpoint(tmp_path / "state_dict.bin")


def test_audiocraft_pointer_resolves_through_the_models_folder(tmp_path):
    models = tmp_path / "models"
    model = random_model(TINY_32K)
    save_model(model, models / "encodec_32khz", format="transformers")
    pointer = tmp_path / "compression_state_dict.bin"
    torch.save({"pretrained": "facebook/encodec_32khz", "exported": True, "version": "1.3.0"},
               pointer)
    assert detect_format(pointer) == "audiocraft"
    checkpoint = read_checkpoint(pointer, models_dir=models)
    assert checkpoint.format == "transformers"
    assert_same_state(checkpoint.state, model.state_dict())
    loaded = load_model("//pretrained/facebook/encodec_32khz", models_dir=models)
    assert loaded.config == replace(TINY_32K, name="encodec_32khz")
    with pytest.raises(registry.ModelNotFoundError, match="encodec_32khz"):
        read_checkpoint(pointer, models_dir=tmp_path / "nothing")


# -- bad files ------------------------------------------------------------------------------
def test_truncated_safetensors(tmp_path):
    written = save_model(random_model(TINY), tmp_path / "m")
    weights = written / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="safetensors") as error:
        load_model(written)
    assert str(weights) in str(error.value)


def test_truncated_pickle(tmp_path):
    save_model(random_model(TINY), tmp_path / "m.th", format="original")
    data = (tmp_path / "m.th").read_bytes()
    (tmp_path / "m.th").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="zip archive") as error:
        read_checkpoint(tmp_path / "m.th", config=TINY)
    assert str(tmp_path / "m.th") in str(error.value)


def test_file_that_is_no_checkpoint(tmp_path):
    (tmp_path / "notes.th").write_text("hello, not a checkpoint\n")
    with pytest.raises(CheckpointError, match="neither a zip archive nor a pickle"):
        read_checkpoint(tmp_path / "notes.th")
    torch.save([torch.zeros(1)], tmp_path / "list.th")
    with pytest.raises(CheckpointError, match="expected a dict"):
        read_checkpoint(tmp_path / "list.th")
    torch.save({"a": 1}, tmp_path / "ints.th")
    with pytest.raises(CheckpointError, match="non-tensor entries"):
        read_checkpoint(tmp_path / "ints.th")
    (tmp_path / "lone.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="carries no config"):
        read_checkpoint(tmp_path / "lone.safetensors")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "readme.txt").write_text("x")
    with pytest.raises(CheckpointError, match="readme.txt"):
        read_checkpoint(tmp_path / "folder")


def test_missing_keys_and_shape_mismatch_are_listed(tmp_path):
    state = random_model(TINY).state_dict()
    broken = {k: v for k, v in state.items() if "decoder.model.0." not in k}
    broken["encoder.model.0.conv.conv.bias"] = torch.zeros(5)
    broken["extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "b.th")
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(tmp_path / "b.th", config=TINY)
    message = str(error.value)
    assert str(tmp_path / "b.th") in message
    assert "missing keys: decoder.model.0.conv.conv.bias" in message
    assert "unexpected keys: extra.weight" in message
    assert "encoder.model.0.conv.conv.bias (4,) != (5,)" in message


def test_transformers_folder_with_foreign_keys(tmp_path):
    written = save_model(random_model(TINY), tmp_path / "tf", format="transformers")
    from safetensors.torch import load_file, save_file

    weights = load_file(written / "model.safetensors")
    weights["encoder.layers.99.conv.bias"] = torch.zeros(1)
    save_file(weights, str(written / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="encoder.layers.99.conv.bias"):
        read_checkpoint(written)


def test_config_json_of_another_kind_or_version(tmp_path):
    written = save_model(random_model(TINY), tmp_path / "m")
    data = json.loads((written / "config.json").read_text())
    (written / "config.json").write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version"):
        read_checkpoint(written)
    (written / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="model_type='bert'"):
        read_checkpoint(written)
    (written / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        read_checkpoint(written)


@pytest.mark.parametrize("edit,match", [
    ({"pad_mode": "zero"}, "unsupported pad mode 'zero'"),
    ({"use_causal_conv": False, "trim_right_ratio": 0.5}, "cannot be built"),
    ({"codebook_dim": 4}, "codebook_dim=4"),
    ({"chunk_length_s": 1.0, "overlap": None}, "needs an overlap"),
])
def test_transformers_configs_tokenwave_cannot_build_are_refused(tmp_path, edit, match):
    written = save_model(random_model(TINY), tmp_path / "tf", format="transformers")
    data = json.loads((written / "config.json").read_text())
    (written / "config.json").write_text(json.dumps({**data, **edit}))
    with pytest.raises(CheckpointError, match=match) as error:
        load_model(written)
    assert str(written) in str(error.value)


class Payload:
    """Unpickling this would call os.mkdir(marker)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.th"
    payload = {"encoder.model.0.conv.conv.bias": Payload(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError, match="weights-only") as error:
        load_model(path)
    assert str(path) in str(error.value)
    assert not marker.exists()


# -- registry -------------------------------------------------------------------------------
def test_the_two_registries_name_what_they_find():
    """codec.registry finds codec files, inference.registry generator folders: no shared function
    name means two things (issue 12); they share the models folder and its one error class."""
    import inspect

    from inference import registry as generators

    def functions(module) -> set[str]:
        return {name for name, value in vars(module).items() if inspect.isfunction(value)
                and value.__module__ == module.__name__ and not name.startswith("_")}

    assert functions(registry) & functions(generators) == set()
    assert registry.find_codec and generators.find_generator and generators.find_t5
    assert generators.ModelNotFoundError is registry.ModelNotFoundError
    assert generators.get_models_dir is registry.get_models_dir


def test_registry_finds_every_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENWAVE_MODELS", str(tmp_path))
    release = tmp_path / "encodec_24khz-d7cc33bc.th"
    release.write_bytes(b"x")
    assert registry.find_codec("encodec_24khz") == release
    assert registry.find_codec("facebook/encodec_24khz") == release
    assert registry.find_codec("encodec_24khz-d7cc33bc.th") == release
    (tmp_path / "encodec_48khz").mkdir()
    (tmp_path / "encodec_48khz" / "config.json").write_text("{}")
    folder = registry.find_codec("//pretrained/facebook/encodec_48khz")
    assert folder == tmp_path / "encodec_48khz"
    (tmp_path / "encodec_16khz.bin").write_bytes(b"x")
    assert registry.find_codec("encodec_16khz") == tmp_path / "encodec_16khz.bin"
    (tmp_path / "facebook" / "encodec_32khz").mkdir(parents=True)
    (tmp_path / "facebook" / "encodec_32khz" / "config.json").write_text("{}")
    assert registry.find_codec("encodec_32khz") == tmp_path / "facebook" / "encodec_32khz"
    (tmp_path / "mine.th").write_bytes(b"x")
    assert registry.find_codec("mine", models_dir=tmp_path) == tmp_path / "mine.th"


def test_registry_explains_what_is_missing_and_never_downloads_unasked(tmp_path, monkeypatch):
    import torch.hub

    def no_network(*args, **kwargs):
        raise AssertionError("download attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.delenv("TOKENWAVE_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(registry.ModelNotFoundError) as error:
        load_model("encodec_48khz", models_dir=tmp_path)
    message = str(error.value)
    assert str(tmp_path / "encodec_48khz-7e698e3e.th") in message
    assert "https://dl.fbaipublicfiles.com/encodec/v0/encodec_48khz-7e698e3e.th" in message
    assert "TOKENWAVE_ALLOW_DOWNLOAD" in message
    with pytest.raises(registry.ModelNotFoundError, match="facebook/encodec_32khz"):
        registry.find_codec("encodec_32khz", models_dir=tmp_path)
    with pytest.raises(registry.ModelNotFoundError, match="neither an existing path"):
        load_model(tmp_path / "no_such_file.th", models_dir=tmp_path)


@pytest.mark.parametrize("opt_in", ["argument", "environment"])
def test_registry_downloads_release_files_only_when_allowed(tmp_path, monkeypatch, opt_in):
    import torch.hub

    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        Path(dst).write_bytes(b"downloaded")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    kwargs = {"allow_download": True} if opt_in == "argument" else {}
    if opt_in == "environment":
        monkeypatch.setenv("TOKENWAVE_ALLOW_DOWNLOAD", "1")
    path = registry.find_codec("encodec_24khz", models_dir=tmp_path / "new", **kwargs)
    assert path == tmp_path / "new" / "encodec_24khz-d7cc33bc.th" and path.is_file()
    assert calls == [("https://dl.fbaipublicfiles.com/encodec/v0/encodec_24khz-d7cc33bc.th",
                      "d7cc33bc")]
    with pytest.raises(registry.ModelNotFoundError):  # not a release file: nothing to fetch
        registry.find_codec("encodec_32khz", models_dir=tmp_path / "new", **kwargs)
    assert len(calls) == 1
