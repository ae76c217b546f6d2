"""User mistakes on the command line end as ``ahn X: error: ...`` with exit status 2 (no traceback),
naming the flag, file or model the user gave, and before anything is written."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from ahn.cli import build_parser, main
from ahn.flops import ModelShape, count

SHIPPED = "Qwen2.5-0.5B-Instruct"  # a shipped config: loads offline


def fails(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI, expect exit 2 with ``ahn <command>: error:`` and every needle in stderr."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert f"ahn {argv[0]}: error: " in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


# ----------------------------------------------------------------------------- flops
@pytest.mark.parametrize("flag, value, minimum", [
    ("--seq-len", "0", 1), ("--window", "0", 1), ("--sinks", "-1", 0), ("--batch", "-2", 1), ("--batch", "0", 1),
    ("--max-len", "0", 1),
])
def test_flops_numeric_flags_are_validated(capsys, tmp_path, flag, value, minimum):
    argv = ["flops", "--model", SHIPPED, "--seq-len", "64", flag, value]
    fails(capsys, argv + ["--plot", str(tmp_path / "f.png")], f"argument {flag}: {value} must be >= {minimum}")
    assert not (tmp_path / "f.png").exists()


def test_flops_count_rejects_an_empty_batch():
    shape = ModelShape(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                       vocab_size=100)
    with pytest.raises(ValueError, match="batch >= 1"):
        count(shape, 64, "full", batch=0)


def test_flops_model_and_plot_errors(capsys, tmp_path):
    gpt2 = tmp_path / "gpt2.json"
    gpt2.write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 100}))
    broken = tmp_path / "broken.json"
    broken.write_text('{"hidden_size": 64,')
    untyped = tmp_path / "untyped.json"
    untyped.write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    for model, needle in [
        (gpt2, "a 'gpt2' config lacks intermediate_size"),
        (broken, f"cannot read the model config of '{broken}'"),
        (untyped, f'{untyped} has no "model_type" field'),
        (tmp_path / "nowhere", f"model '{tmp_path / 'nowhere'}' not found: no such directory, and not a reachable "
                               "Hub id"),
    ]:
        fails(capsys, ["flops", "--model", str(model), "--seq-len", "64"], needle)
    fails(capsys, ["flops", "--model", SHIPPED, "--seq-len", "64", "--plot", str(tmp_path / "no" / "f.png")],
          f"--plot {tmp_path / 'no' / 'f.png'}: the folder '{tmp_path / 'no'}' does not exist")


# ----------------------------------------------------------------------------- eval (no model needed)
@pytest.mark.parametrize("device", ["bogus", pytest.param("cuda", id="gpu-absent", marks=pytest.mark.skipif(
    torch.cuda.is_available(), reason="cuda is usable here"))])
def test_eval_refuses_an_unusable_device(capsys, tmp_path, device):
    fails(capsys, ["eval", "longbench", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o"), "--device",
                   device], f"--device '{device}' cannot be used here")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- demo
@pytest.mark.parametrize("flags, needle", [
    (["--threads", "-1"], "argument --threads: -1 must be >= 1"),
    (["--steps", "0"], "argument --steps: 0 must be >= 1"),
    (["--pairs", "500"], "--pairs 500: the demo's sequences hold at most 62 key-value pairs"),
])
def test_demo_flag_errors_name_the_flag_and_create_nothing(capsys, tmp_path, flags, needle):
    out = tmp_path / "demo"
    err = fails(capsys, ["demo", "--out", str(out), "--no-progress", *flags], needle)
    assert "num_keys" not in err and "save_steps" not in err
    assert not out.exists()


def test_demo_out_must_be_a_writable_folder(capsys, tmp_path, read_only_dir):
    plain = tmp_path / "file"
    plain.write_text("x")
    fails(capsys, ["demo", "--out", str(plain), "--steps", "1", "--no-progress"], f"--out {plain} is a file")
    for out in (read_only_dir, read_only_dir / "sub"):
        fails(capsys, ["demo", "--out", str(out), "--steps", "1", "--no-progress"],
              f"{read_only_dir} is not a writable folder")
    assert list(read_only_dir.iterdir()) == []


# ----------------------------------------------------------------------------- parser
def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_flags_are_never_abbreviated(capsys):
    """``--lr`` must not silently become ``--lr-scheduler`` (nor ``--seq`` ``--seq-len``)."""
    with pytest.raises(SystemExit) as e:
        main(["distill", "--model", "m", "--lr", "1e-3"])
    assert e.value.code == 2 and "unrecognized arguments: --lr 1e-3" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["flops", "--model", SHIPPED, "--seq", "64"])
    assert e.value.code == 2 and "--seq" in capsys.readouterr().err


def test_help_shows_real_defaults_and_examples(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping inside the strings looked for
    helps = {name: p.format_help() for name, p in subcommands().items()}
    assert set(helps) == {"demo", "distill", "eval", "flops", "generate"}
    for name, text in helps.items():
        assert "(default: None)" not in text, name
    for name in ("demo", "eval", "flops", "generate"):
        assert "examples:\n  ahn " + name in helps[name], name
    assert "(default: full,window,ahn)" in helps["eval"] and "(default: 42)" in helps["eval"]
    assert "(default: 32640)" in helps["flops"] and "(default: gated_deltanet)" in helps["demo"]


def test_flops_plot_into_a_folder_that_cannot_be_written(capsys, read_only_dir, monkeypatch):
    """Item 9 of issue 25: ``ahn flops --plot`` into a read-only folder ended in a traceback; it is refused before
    anything is computed, and a write that fails anyway (a full disk) is a clean error too."""
    fails(capsys, ["flops", "--model", SHIPPED, "--seq-len", "64", "--plot", str(read_only_dir / "f.png")],
          f"--plot {read_only_dir / 'f.png'}: the folder '{read_only_dir}' is not writable")
    assert list(read_only_dir.iterdir()) == []
    import ahn.plotting

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ahn.plotting, "_finish", disk_full)  # where matplotlib writes the file
    fails(capsys, ["flops", "--model", SHIPPED, "--seq-len", "64", "--readout", "add", "--plot",
                   str(read_only_dir.parent / "f.png")],
          "the plot could not be written", "No space left on device")
