"""``tokenwave generate`` with absurd arguments: each one a one-line error naming the option.

For every row: a non-zero exit status, exactly one line on stderr that names the offending
option, no traceback, nothing on stdout and no output file. Arguments that no model can use are
refused before a model is loaded (the table says which rows need one: the shipped model's 10 s
window decides those).
"""
from __future__ import annotations

import pytest

from inference import MusicGen, cli

NO_MODEL, MODEL = False, True
CASES = [
    # option, its values, whether the model must be known to refuse it
    ("--duration", ["inf"], NO_MODEL), ("--duration", ["-inf"], NO_MODEL), ("--duration", ["nan"], NO_MODEL),
    ("--duration", ["1e9"], NO_MODEL), ("--duration", ["3600.5"], NO_MODEL), ("--duration", ["0"], NO_MODEL),
    ("--duration", ["-1"], NO_MODEL), ("--duration", ["ten"], NO_MODEL),
    ("--seed", ["1e20"], NO_MODEL), ("--seed", [str(2**70)], NO_MODEL), ("--seed", ["1.5"], NO_MODEL),
    ("--temperature", ["nan"], NO_MODEL), ("--temperature", ["inf"], NO_MODEL),
    ("--temperature", ["0"], NO_MODEL), ("--temperature", ["-1"], NO_MODEL),
    ("--cfg-coef", ["nan"], NO_MODEL), ("--cfg-coef", ["inf"], NO_MODEL), ("--cfg-coef", ["-inf"], NO_MODEL),
    ("--top-k", ["-1"], NO_MODEL), ("--top-k", ["2.5"], NO_MODEL),
    ("--top-p", ["2"], NO_MODEL), ("--top-p", ["-0.1"], NO_MODEL), ("--top-p", ["nan"], NO_MODEL),
    ("--batch-size", ["0"], NO_MODEL), ("--batch-size", ["-3"], NO_MODEL),
    ("--chunk-frames", ["0"], NO_MODEL), ("--chunk-frames", ["-1"], NO_MODEL),
    ("--extend-stride", ["nan"], NO_MODEL), ("--extend-stride", ["0"], NO_MODEL),
    ("--extend-stride", ["-1"], NO_MODEL), ("--extend-stride", ["inf"], NO_MODEL),
    ("--format", ["wav"], NO_MODEL), ("--dtype", ["int3"], NO_MODEL), ("--subtype", ["PCM_7"], NO_MODEL),
    ("--target-lufs", ["nan"], NO_MODEL), ("--target-lufs", ["inf"], NO_MODEL), ("--target-lufs", ["5"], NO_MODEL),
    ("--extend-stride", ["10"], MODEL), ("--extend-stride", ["25"], MODEL),
]


@pytest.fixture
def loads(monkeypatch) -> list:
    """Records every model load (the real one still runs)."""
    calls = []
    original = MusicGen.from_pretrained.__func__

    def recorded(cls, *args, **kwargs):
        calls.append(args)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(MusicGen, "from_pretrained", classmethod(recorded))
    return calls


@pytest.mark.parametrize("option,values,needs_model", CASES,
                         ids=[f"{option}={' '.join(values)}" for option, values, _ in CASES])
def test_absurd_generate_arguments_are_one_line_errors(tmp_path, capsys, loads, option, values, needs_model):
    out = tmp_path / "out.wav"
    code = cli.main(["generate", "calm piano", "-o", str(out), "--duration", "0.2", option, *values])
    stdout, stderr = capsys.readouterr()
    assert code != 0
    assert stderr.count("\n") == 1 and stderr.endswith("\n"), stderr
    assert option in stderr and "error" in stderr, stderr
    assert "Traceback" not in stderr and stdout == ""
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert bool(loads) == needs_model  # refused before loading a model where the model is not needed


def test_the_greedy_hint(tmp_path, capsys):
    assert cli.main(["generate", "calm", "-o", str(tmp_path / "x.wav"), "--temperature", "0"]) == 1
    assert "--greedy" in capsys.readouterr().err
