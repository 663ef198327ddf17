"""codec.files (one atomic writer, one safe reader) and the one-way codec.formats -> codec.model
arrow (issue 12)."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

from codec import ecdc
from codec.files import (CheckpointError, atomic_path, atomic_write, read_json_file, read_pickle,
                         write_json_file)

CODEC = Path(__file__).resolve().parent.parent / "codec"


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_atomic_write_gives_files_and_folders_the_umask_mode(tmp_path):
    previous = os.umask(0o027)
    try:
        file = atomic_write(tmp_path / "a.txt", lambda tmp: tmp.write_text("x"))
        folder = atomic_write(tmp_path / "f", lambda tmp: (tmp / "w.txt").write_text("y"),
                              folder=True)
    finally:
        os.umask(previous)
    assert _mode(file) == 0o640 and _mode(folder) == 0o750 and _mode(folder / "w.txt") == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "f"]  # no temporaries left


def test_atomic_write_keeps_the_old_result_when_the_writer_fails(tmp_path):
    target = atomic_write(tmp_path / "f", lambda tmp: (tmp / "old").write_text("1"), folder=True)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        atomic_write(target, lambda tmp: None, folder=True)

    def crash(tmp: Path) -> None:
        (tmp / "new").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash, folder=True, overwrite=True)
    assert [p.name for p in target.iterdir()] == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_atomic_path_commits_on_success_and_names_the_target_in_errors(tmp_path):
    import errno

    target = tmp_path / "out.bin"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    with pytest.raises(OSError, match=rf"cannot write {str(target)!r}: No space") as caught:
        with atomic_path(target, overwrite=True) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert ".tmp" not in str(caught.value) and target.read_bytes() == b"new"
    folder = tmp_path / "taken"
    (folder / "inner").mkdir(parents=True)
    with pytest.raises(OSError, match=rf"cannot write {str(folder)!r}"):  # the rename fails
        with atomic_path(folder, overwrite=True) as tmp:
            tmp.write_bytes(b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "taken"]


def test_write_json_file_replaces_the_file_and_reads_back(tmp_path):
    previous = os.umask(0o022)
    try:
        path = write_json_file(tmp_path / "sub" / "state.json", {"step": 1})
        write_json_file(path, {"step": 2, "names": ["a"]})
    finally:
        os.umask(previous)
    assert read_json_file(path) == {"step": 2, "names": ["a"]} and _mode(path) == 0o644
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_json_file(path, {}, overwrite=False)
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]


def test_read_pickle_names_the_file_and_refuses_code(tmp_path):
    junk = tmp_path / "junk.th"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.th: expected a torch checkpoint"):
        read_pickle(junk)


def test_a_corrupt_entropy_lm_file_is_named(tmp_path):
    (tmp_path / "encodec_lm_24khz.th").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ecdc.EcdcError, match="encodec_lm_24khz.th"):
        ecdc.load_entropy_lm("encodec_24khz", models_dir=tmp_path)


def _codec_imports(path: Path) -> set[str]:
    """Modules of codec that ``path`` imports, at any depth of its code (lazy ones too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            names.add(node.module or "")
            names.update(alias.name for alias in node.names if node.module is None)
    return names


def test_the_model_never_imports_the_formats_and_still_loads_and_saves(tmp_path):
    assert not any(name.startswith("formats") for name in _codec_imports(CODEC / "model.py"))
    from codec.model import EncodecConfig, EncodecModel

    model = EncodecModel(EncodecConfig(n_filters=4, dimension=8, num_codebooks=2,
                                       codebook_size=16, lstm=0))
    model.save_pretrained(tmp_path / "m")
    loaded = EncodecModel.from_pretrained(tmp_path / "m", inference=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 loaded.state_dict().values()))


def test_read_pickle_mmap_maps_zip_files_and_reads_legacy_ones_whole(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    modern, legacy = tmp_path / "modern.th", tmp_path / "legacy.th"
    torch.save(state, modern)
    torch.save(state, legacy, _use_new_zipfile_serialization=False)  # cannot be memory-mapped
    for path in (modern, legacy):
        assert torch.equal(read_pickle(path, mmap=True)["w"], state["w"])
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint")  # torch's mmap refusal must not hide what is wrong
    with pytest.raises(CheckpointError, match="junk.bin: expected a torch checkpoint"):
        read_pickle(junk, mmap=True)
