"""Hub names: the Hugging Face cache, downloads through huggingface_hub, offline use, errors.

Nothing leaves 127.0.0.1: ``tests/hub_server.py`` serves tiny random models (a transformers
MusicGen folder with its tokenizer, a T5, an EnCodec, an audiocraft checkpoint that only names its
T5 and codec) at ``HF_ENDPOINT``; cache layouts are written the way huggingface_hub writes them.
Each test gets its own ``HF_HOME`` (so its own cache) and an empty ``$TOKENWAVE_MODELS``.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from hub_server import HubServer, read_folder, write_cache
from t5_fixture import tiny_t5_folder  # noqa: F401  (fixture)

from codec.formats import save_model
from codec.model import EncodecModel
from inference import MusicGen, hub, load_generator, registry
from inference.cli import main as cli_main
from inference.cli import random_model

transformers = pytest.importorskip("transformers")
from test_generator import AUDIOCRAFT_YAML, CODEC, build_tiny_generator, write_audiocraft  # noqa: E402
from test_musicgen_oracle import build_and_save, codec_config  # noqa: E402

REPO = "facebook/tiny-musicgen"
PROMPTS = ["happy rock song with electric guitar", "calm piano"]


def tokens(generator: MusicGen) -> torch.Tensor:
    return generator.generate(PROMPTS, 0.03, seed=3, return_tokens=True).tokens


@pytest.fixture(scope="module")
def folders(tiny_t5_folder, tmp_path_factory):  # noqa: F811
    """Local model folders: two MusicGen commits, an EnCodec, an audiocraft checkpoint and its parts."""
    root = tmp_path_factory.mktemp("hub_models")
    build_and_save(root / "musicgen_v1", tiny_t5_folder, seed=0)
    build_and_save(root / "musicgen_main", tiny_t5_folder, seed=1)
    for name in ("musicgen_v1", "musicgen_main"):  # files tokenwave must not fetch
        (root / name / "pytorch_model.bin").write_bytes(os.urandom(4096))
        (root / name / "flax_model.msgpack").write_bytes(os.urandom(4096))
        (root / name / "README.md").write_text("# tiny\n")
    torch.manual_seed(0)
    transformers.EncodecModel(codec_config()).save_pretrained(str(root / "encodec"))
    save_model(random_model(CODEC, seed=0), root / "tiny_codec", format="transformers")
    ours = build_tiny_generator(t5_folder=tiny_t5_folder, seed=6, codec_seed=0)
    write_audiocraft(root / "audiocraft", ours, AUDIOCRAFT_YAML, codec_pointer="facebook/tiny_codec")
    shutil.copytree(tiny_t5_folder, root / "t5")
    return root


@pytest.fixture(scope="module")
def server(folders):
    with HubServer() as hub_server:
        hub_server.add_repo(REPO, read_folder(folders / "musicgen_v1"), refs=("v1",))
        hub_server.add_repo(REPO, read_folder(folders / "musicgen_main"), refs=("main",))
        hub_server.add_repo("facebook/tiny-encodec", read_folder(folders / "encodec"))
        hub_server.add_repo("facebook/tiny_codec", read_folder(folders / "tiny_codec"))
        hub_server.add_repo("t5-tiny", read_folder(folders / "t5"))
        hub_server.add_repo("facebook/tiny-audiocraft", read_folder(folders / "audiocraft"))
        hub_server.add_repo("facebook/gated-musicgen", read_folder(folders / "musicgen_main"), gated=True)
        yield hub_server


@pytest.fixture()
def env(tmp_path, monkeypatch):
    """A fresh Hugging Face home (cache ``<tmp>/hf/hub``), an empty models folder, online."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT", "HF_TOKEN", *hub.OFFLINE_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TOKENWAVE_MODELS", str(tmp_path / "models"))
    return tmp_path / "hf" / "hub"


@pytest.fixture()
def online(env, server, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    with server._lock:
        server.log.clear()
    return env


def gets(server: HubServer, repo: str = REPO) -> list[str]:
    """The files fetched from ``repo`` (GET on resolve), in order."""
    prefix = f"/{repo}/resolve/"
    paths = [path for _, path, _ in server.requests("GET") if path.startswith(prefix)]
    return [path[len(prefix):].split("/", 1)[1] for path in paths]


# -- choosing files ---------------------------------------------------------------------------------
def test_select_files_prefers_safetensors_and_takes_only_what_is_read():
    listing = ["config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5", "spiece.model",
               "tokenizer.json", "tokenizer_config.json", "state_dict.bin", "compression_state_dict.bin",
               "README.md", "sub/config.json", "generation_config.json"]
    assert hub.select_files(listing, "r") == ["config.json", "generation_config.json", "tokenizer_config.json",
                                              "tokenizer.json", "spiece.model", "model.safetensors"]
    sharded = ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
               "model-00002-of-00002.safetensors", "pytorch_model-00001-of-00002.bin"]
    assert hub.select_files(sharded, "r")[1:] == sharded[1:4]
    assert hub.select_files(["config.json", "pytorch_model.bin", "state_dict.bin"], "r") == \
        ["config.json", "pytorch_model.bin"]
    assert hub.select_files(["state_dict.bin", "compression_state_dict.bin", "README.md"], "r") == \
        ["state_dict.bin", "compression_state_dict.bin"]
    with pytest.raises(hub.MissingRepoError, match="neither config.json nor state_dict.bin"):
        hub.select_files(["README.md"], "someone/notes")


def test_names_and_revisions():
    assert registry.hub_repo("musicgen-small") == "facebook/musicgen-small"
    assert registry.hub_repo("facebook/musicgen_stereo_small") == "facebook/musicgen-stereo-small"
    assert registry.hub_repo("someone/my-musicgen@v2") == "someone/my-musicgen"
    assert registry.hub_repo("no-such-model") is None and registry.hub_repo("./a/b") is None
    assert hub.split_revision("//pretrained/facebook/x@abc") == ("facebook/x", "abc")
    with pytest.raises(ValueError, match="two revisions"):
        hub.split_revision("facebook/x@a", "b")
    assert hub.codec_repo("encodec_24khz") == "facebook/encodec_24khz"
    assert hub.codec_repo("encodec_lm_24khz") is None
    assert hub.t5_repos("t5-base") == ["t5-base", "google-t5/t5-base"]


# -- the cache ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("variable", ["HF_HOME", "HF_HUB_CACHE"])
def test_cache_hit_offline(folders, env, tmp_path, monkeypatch, variable):
    cache = env if variable == "HF_HOME" else tmp_path / "elsewhere"
    if variable == "HF_HUB_CACHE":
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    snapshot = write_cache(cache, REPO, read_folder(folders / "musicgen_main"))
    assert (snapshot / "model.safetensors").is_symlink()
    monkeypatch.setenv("TOKENWAVE_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: any request would fail
    assert registry.find_generator(REPO) == snapshot
    loaded = MusicGen.from_pretrained(REPO, device="cpu")
    assert torch.equal(tokens(loaded), tokens(MusicGen.from_pretrained(folders / "musicgen_main", device="cpu")))


def test_any_complete_snapshot_serves_a_name_without_revision(folders, env, monkeypatch):
    old = write_cache(env, REPO, read_folder(folders / "musicgen_v1"), refs=())  # fetched pinned, no ref
    assert hub.find_cached(REPO) == old
    files = read_folder(folders / "musicgen_main")
    del files["model.safetensors"], files["pytorch_model.bin"]
    write_cache(env, REPO, files)  # main: interrupted, never loaded half
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert registry.find_generator(REPO) == old
    assert hub.find_cached(REPO, "main") is None


# -- downloading --------------------------------------------------------------------------------------
def test_download_then_offline_reuse(folders, online, server, monkeypatch):
    loaded = MusicGen.from_pretrained(REPO, device="cpu")
    fetched = set(gets(server))
    junk = {"pytorch_model.bin", "flax_model.msgpack", "README.md"}
    assert fetched == set(read_folder(folders / "musicgen_main")) - junk  # each file once, none it does not read
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= fetched
    commit = server.repos[REPO].refs["main"]
    assert (online / "models--facebook--tiny-musicgen" / "refs" / "main").read_text() == commit
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    server.log.clear()
    again = MusicGen.from_pretrained(REPO, device="cpu")
    assert server.requests() == []
    reference = MusicGen.from_pretrained(folders / "musicgen_main", device="cpu")
    assert torch.equal(tokens(loaded), tokens(reference)) and torch.equal(tokens(again), tokens(reference))


def test_revision_pinning(folders, online, server, monkeypatch):
    v1 = server.repos[REPO].refs["v1"]
    pinned = load_generator(REPO, revision="v1", device="cpu")
    assert registry.find_generator(f"{REPO}@v1") == online / "models--facebook--tiny-musicgen" / "snapshots" / v1
    main = MusicGen.from_pretrained(REPO, device="cpu")
    expected_v1 = tokens(MusicGen.from_pretrained(folders / "musicgen_v1", device="cpu"))
    assert torch.equal(tokens(pinned), expected_v1)
    assert torch.equal(tokens(main), tokens(MusicGen.from_pretrained(folders / "musicgen_main", device="cpu")))
    assert not torch.equal(tokens(main), expected_v1)
    monkeypatch.setenv("TOKENWAVE_OFFLINE", "1")
    server.log.clear()
    for revision in ("v1", v1):  # a tag through refs/v1, a commit directly
        assert torch.equal(tokens(load_generator(REPO, revision=revision, device="cpu")), expected_v1)
    assert server.requests() == []
    # A pinned revision skips the models folder: a folder there is not "v1".
    shutil.copytree(folders / "musicgen_main", online.parent.parent / "models" / "tiny-musicgen")
    assert registry.find_generator(REPO).parent.name == "models"
    assert registry.find_generator(REPO, revision="v1").name == v1


def test_interrupted_download_is_retried(folders, online, server):
    server.drop_once.add((REPO, "model.safetensors"))  # half the bytes, then the connection drops
    path = hub.download(REPO)
    assert len([p for _, p, _ in server.requests("GET") if p.endswith("/model.safetensors")]) == 2
    assert (path / "model.safetensors").read_bytes() == (folders / "musicgen_main" / "model.safetensors").read_bytes()
    assert not list(online.rglob("*.incomplete"))


def test_failed_download_is_never_loaded_half_and_a_retry_completes_it(folders, online, server, monkeypatch,
                                                                       capsys):
    server.fail.add((REPO, "model.safetensors"))
    try:
        with pytest.raises(hub.DownloadError, match=f"run `tokenwave download {REPO}` again"):
            MusicGen.from_pretrained(REPO, device="cpu")
    finally:
        server.fail.discard((REPO, "model.safetensors"))
    snapshot = online / "models--facebook--tiny-musicgen" / "snapshots" / server.repos[REPO].refs["main"]
    assert (snapshot / "config.json").is_file() and not (snapshot / "model.safetensors").exists()
    assert not list(online.rglob("*.incomplete"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(registry.ModelNotFoundError, match="incomplete download.*missing model.safetensors"):
        MusicGen.from_pretrained(REPO, device="cpu")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert cli_main(["download", REPO]) == 0
    assert str(snapshot) in capsys.readouterr().out
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = MusicGen.from_pretrained(REPO, device="cpu")
    assert torch.equal(tokens(loaded), tokens(MusicGen.from_pretrained(folders / "musicgen_main", device="cpu")))


# -- errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["TOKENWAVE_OFFLINE", "HF_HUB_OFFLINE", "local_files_only"])
def test_offline_miss_says_so_and_how_to_fetch(online, server, monkeypatch, how):
    if how == "local_files_only":
        with pytest.raises(registry.ModelNotFoundError) as error:
            load_generator(REPO, local_files_only=True)
    else:
        monkeypatch.setenv(how, "1")
        with pytest.raises(registry.ModelNotFoundError) as error:
            MusicGen.from_pretrained(REPO)
    message = str(error.value)
    assert f"{REPO} is not in the Hugging Face cache ({online})" in message
    assert f"downloads are off ({how}{'=True' if how == 'local_files_only' else '=1'})" in message
    assert f"run `tokenwave download {REPO}`" in message
    assert server.requests() == []


def test_gated_missing_repo_and_revision_errors(online, server):
    with pytest.raises(hub.GatedModelError, match="facebook/gated-musicgen is a gated repository: accept"):
        MusicGen.from_pretrained("facebook/gated-musicgen")
    with pytest.raises(hub.MissingRepoError, match="no repository facebook/no-such-model on http://127.0.0.1"):
        MusicGen.from_pretrained("facebook/no-such-model")
    with pytest.raises(hub.MissingRepoError, match=f"{REPO} has no revision 'v9'"):
        load_generator(REPO, revision="v9")
    assert not (online / "models--facebook--gated-musicgen" / "snapshots").exists()


def test_unreachable_hub_and_not_cached(env, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(registry.ModelNotFoundError, match=r"cannot be reached \(ConnectError"):
        MusicGen.from_pretrained(REPO)


# -- what checkpoints only name: T5 and codec ---------------------------------------------------------------
def test_audiocraft_checkpoint_gets_the_t5_and_codec_it_names(tiny_t5_folder, online, server,  # noqa: F811
                                                              monkeypatch):
    loaded = MusicGen.from_pretrained("facebook/tiny-audiocraft", device="cpu")
    ours = build_tiny_generator(t5_folder=tiny_t5_folder, seed=6, codec_seed=0)
    prompts = ["happy rock song with electric guitar and drums", "calm piano"]
    assert torch.equal(loaded.generate(prompts, 0.08, seed=3, return_tokens=True).tokens,
                       ours.generate(prompts, 0.08, seed=3, return_tokens=True).tokens)
    assert sorted(gets(server, "t5-tiny")) == ["config.json", "model.safetensors", "spiece.model"]
    assert sorted(gets(server, "facebook/tiny_codec")) == ["config.json", "model.safetensors"]
    monkeypatch.setenv("TOKENWAVE_OFFLINE", "1")
    assert registry.find_t5("t5-tiny") == hub.find_cached("t5-tiny")
    MusicGen.from_pretrained("facebook/tiny-audiocraft", device="cpu")


def test_encodec_by_hub_name(folders, online, server, monkeypatch):
    model = EncodecModel.from_pretrained("facebook/tiny-encodec")
    reference = EncodecModel.from_pretrained(folders / "encodec")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    server.log.clear()
    EncodecModel.from_pretrained("//pretrained/facebook/tiny-encodec")
    assert server.requests() == []
    with pytest.raises(FileNotFoundError, match="facebook/encodec_32khz is not in the Hugging Face cache"):
        EncodecModel.from_pretrained("encodec_32khz")


# -- the command line -----------------------------------------------------------------------------------------
def test_cli_download_and_models(online, server, monkeypatch, capsys):
    assert cli_main(["download", "facebook/tiny-audiocraft"]) == 0
    out = capsys.readouterr().out
    for repo in ("facebook/tiny-audiocraft", "t5-tiny", "facebook/tiny_codec"):
        assert f"{repo}: {online / ('models--' + repo.replace('/', '--'))}" in out
    assert cli_main(["download", REPO, "--revision", "v1", "-q"]) == 0
    assert capsys.readouterr().out == ""
    assert cli_main(["models"]) == 0
    out = capsys.readouterr().out
    assert "tokenwave-small" in out and "generator (tokenwave)" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "generator (audiocraft)" in lines["facebook/tiny-audiocraft"]
    assert "generator (transformers)" in lines[REPO] and f"v1 {server.repos[REPO].refs['v1'][:8]}" in lines[REPO]
    assert "t5" in lines["t5-tiny"] and "codec" in lines["facebook/tiny_codec"]
    assert " KB" in lines[REPO]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli_main(["download", REPO]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tokenwave: error: cannot download") and "HF_HUB_OFFLINE=1" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert cli_main(["download", "facebook/no-such-model"]) == 1
    assert "no repository facebook/no-such-model" in capsys.readouterr().err


def test_codec_alone_finds_the_hub_through_its_entry_point(folders, env, monkeypatch):
    """``from codec import ...`` imports nothing above codec; the resolver comes from the entry point."""
    import subprocess
    import sys

    write_cache(env, "facebook/tiny-encodec", read_folder(folders / "encodec"))
    code = ("import sys; from codec.model import EncodecModel; assert 'inference' not in sys.modules; "
            "m = EncodecModel.from_pretrained('facebook/tiny-encodec'); print(m.config.sample_rate)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TOKENWAVE_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == str(codec_config().sampling_rate)


def test_dependencies_of_a_corrupt_audiocraft_file_name_it(tmp_path):
    (tmp_path / "state_dict.bin").write_bytes(b"\x80\x02not a checkpoint")
    from codec.files import CheckpointError

    with pytest.raises(CheckpointError, match="state_dict.bin: expected a torch checkpoint"):
        hub.dependencies(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")  # not an object: the folder's kind is unknown
    assert hub.kind_of(tmp_path) == "generator (audiocraft)"
