"""Streaming reads and ``ahn generate``: text pieces tokenize to the whole text's ids, the model's chunks do not
depend on how ids arrive, a saved read continued by a second command equals one run, bad input exits 2
naming the file; the streaming benchmark runs at small sizes."""

from __future__ import annotations

import io
import re
import sys

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

import ahn
from ahn.cli import build_parser, main
from ahn.generate import (
    DEFAULT_CHUNK, chat_frame, line_pieces, read, special_prefix, splits_at_line_starts, token_pieces,
)
from helpers import assert_same_cache, byte_tokenizer, save_byte_lm

WINDOW, SINKS = 16, 3
LINES = ["Alpha beta, gamma.", "  indented line", "", "\ttabbed", "数字 123 and 4567.", "(end) don't", "x" * 90]
TEXT = "\n".join(LINES[i % len(LINES)] + f" {i}" for i in range(200)) + "\n\n  trailing"


def test_line_pieces_cut_at_line_starts():
    pieces = list(line_pieces(iter([TEXT[i: i + 37] for i in range(0, len(TEXT), 37)]), piece_chars=100))
    assert "".join(pieces) == TEXT and len(pieces) > 10
    for a, b in zip(pieces, pieces[1:]):
        assert len(a) < 100 + 37 and a.endswith("\n") and not b[0].isspace()
    assert list(line_pieces(["one line " * 50, "\n  no line start after it"], piece_chars=10)) == \
        ["one line " * 50 + "\n  no line start after it"]


def sentencepiece_like() -> PreTrainedTokenizerFast:
    """Metaspace pre-tokenization: each call's text gets a leading "▁", so pieces do not tokenize like the whole."""
    alphabet = sorted(set(TEXT + "▁"))
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[], unk_token=alphabet[0]))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def with_bos() -> PreTrainedTokenizerFast:
    """The byte tokenizer with a BOS before every text and an EOS after it."""
    tok = byte_tokenizer()
    bos, eos = len(tok), tok.eos_token_id
    tok.add_special_tokens({"bos_token": "<s>"})
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A <|im_end|>", special_tokens=[("<s>", bos), ("<|im_end|>", eos)])
    return tok


def test_token_pieces_are_the_whole_texts_ids():
    blocks = [TEXT[i: i + 64] for i in range(0, len(TEXT), 64)]
    plain, spm, bos = byte_tokenizer(), sentencepiece_like(), with_bos()
    assert splits_at_line_starts(plain) and not splits_at_line_starts(spm)
    for tok in (plain, spm):
        pieces = list(token_pieces(tok, iter(blocks), piece_chars=200))
        assert sum(pieces, []) == tok(TEXT)["input_ids"]
    assert len(list(token_pieces(plain, iter(blocks), piece_chars=200))) > 10  # really streamed
    whole = bos(TEXT)["input_ids"]
    assert special_prefix(bos) == whole[:1] and sum(token_pieces(bos, iter(blocks), piece_chars=200), []) == whole[:-1]
    chat = plain.apply_chat_template([{"role": "user", "content": TEXT}], add_generation_prompt=True)["input_ids"]
    assert sum(token_pieces(plain, iter(blocks), chat=True, piece_chars=200), []) == chat
    spm.chat_template = None
    with pytest.raises(ValueError, match="--chat: the model's tokenizer has no chat template"):
        chat_frame(spm)
    plain.chat_template = "{{ messages[0]['content'] | upper }}"
    with pytest.raises(ValueError, match="alters the message text"):
        chat_frame(plain)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir with a byte tokenizer and a chat template, adapter dir with a non-zero random memory and every
    salience option, the AHN model)."""

    def perturb(model):
        with torch.no_grad():
            for name, p in model.named_memory_parameters():
                p.add_(torch.randn(p.shape) * 0.3)

    return save_byte_lm(tmp_path_factory, ahn.AHNConfig(window=WINDOW, sinks=SINKS, buffer_slots=2,
                                                        salience_writes=True, readout="defer"), perturb)


def test_read_does_not_depend_on_how_the_ids_arrive(tiny):
    model = tiny[2]
    x = torch.randint(0, 200, (157,)).tolist()
    one, other = model.new_cache(), model.new_cache()
    a = read(model, [x], one, chunk=32)
    b = read(model, [x[:5], x[5:90], [], x[90:]], other, chunk=32)
    assert torch.equal(a, b) and a.shape == (1, model.config.vocab_size)
    assert_same_cache(one, other)
    assert read(model, [], model.new_cache()) is None


def generate(capsys, tiny, *flags) -> tuple[str, str]:
    """Run ``ahn generate`` on the tiny model; (stdout, stderr)."""
    model_dir, adapter_dir, _ = tiny
    assert main(["generate", "--model", model_dir, "--adapter", adapter_dir, "--no-progress", "--chunk", "32",
                 *flags]) == 0
    return capsys.readouterr()


def test_a_saved_read_continued_by_a_second_command_equals_one_run(tiny, tmp_path, capsys):
    """Byte tokens, and a book of a whole number of chunks: book + question in one run makes the same forward
    calls as reading the book, saving, and reading the question from the state in a second command."""
    book, question = "the quick brown fox\n" * 16, "What did the fox do?\n"  # 320 bytes: 10 chunks
    (tmp_path / "book.txt").write_text(book)
    (tmp_path / "question.txt").write_text(question)
    (tmp_path / "both.txt").write_text(book + question)
    state = tmp_path / "book.state"
    out, err = generate(capsys, tiny, "--input", str(tmp_path / "book.txt"), "--save-state", str(state),
                        "--max-new-tokens", "0")
    assert out == "" and "read 320 tokens" in err and f"state saved to {state}" in err
    continued, err = generate(capsys, tiny, "--state", str(state), "--input", str(tmp_path / "question.txt"),
                              "--max-new-tokens", "24")
    assert "read 21 tokens" in err and "341 tokens in the state" in err and "generated" in err
    once, _ = generate(capsys, tiny, "--input", str(tmp_path / "both.txt"), "--max-new-tokens", "24")
    assert continued == once and len(continued.strip()) > 0
    # standard input reads the same
    sys_stdin = io.TextIOWrapper(io.BytesIO((book + question).encode()))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sys, "stdin", sys_stdin)
        from_stdin, _ = generate(capsys, tiny, "--input", "-", "--max-new-tokens", "24")
    assert from_stdin == once
    chat, err = generate(capsys, tiny, "--state", str(state), "--input", str(tmp_path / "question.txt"),
                         "--max-new-tokens", "4", "--chat")
    turn = byte_tokenizer().apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    assert f"read {len(turn['input_ids'])} tokens" in err  # the question as a user turn, with the generation prompt


def test_bad_input_exits_2_naming_the_file_before_anything_is_written(tiny, tmp_path, capsys):
    files = {"empty.txt": b"", "blank.txt": b" \n\t\n", "nul.bin": b"text\x00more", "latin1.txt": "café".encode("latin-1"),
             "ok.txt": b"some text\n"}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "folder").mkdir()
    (tmp_path / "broken.state").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    save = tmp_path / "out.state"
    other = tmp_path / "other"
    other.mkdir()
    for flags, message in [
        (["--input", str(tmp_path / "nope.txt")], f"--input {tmp_path / 'nope.txt'}: no such file"),
        (["--input", str(tmp_path / "folder")], "is a folder; give a text file"),
        (["--input", str(tmp_path / "empty.txt")], f"--input {tmp_path / 'empty.txt'} is empty"),
        (["--input", str(tmp_path / "blank.txt")], "is empty (no text, or only whitespace)"),
        (["--input", str(tmp_path / "nul.bin")], f"--input {tmp_path / 'nul.bin'} is a binary file (a NUL byte at "
                                                 "byte 4)"),
        (["--input", str(tmp_path / "latin1.txt")], "is not UTF-8 text (byte 3 cannot be decoded: e9)"),
        (["--input", str(tmp_path / "ok.txt"), "--state", str(tmp_path / "nope.state")], "--state"),
        (["--input", str(tmp_path / "ok.txt"), "--state", str(tmp_path / "broken.state")],
         "is not a readable state file"),
        (["--input", str(tmp_path / "ok.txt"), "--save-state", str(tmp_path / "no" / "s.state")],
         f"--save-state {tmp_path / 'no' / 's.state'}: the folder"),
        (["--input", str(tmp_path / "ok.txt"), "--save-state", str(other)], "is a folder; give a file name"),
        (["--input", str(tmp_path / "ok.txt"), "--max-new-tokens", "-1"], "argument --max-new-tokens: -1 must be >= 0"),
        (["--input", str(tmp_path / "ok.txt"), "--chunk", "0"], "argument --chunk: 0 must be >= 1"),
    ]:
        if "--save-state" not in flags:
            flags += ["--save-state", str(save)]
        with pytest.raises(SystemExit) as e:
            generate(capsys, tiny, *flags)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "ahn generate: error: " in err and message in err and "Traceback" not in err, err
        assert not save.exists()


def test_a_state_of_another_adapter_or_window_is_refused(tiny, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("a text to remember\n" * 3)
    state = tmp_path / "a.state"
    generate(capsys, tiny, "--input", str(tmp_path / "a.txt"), "--save-state", str(state), "--max-new-tokens", "0")
    model_dir, adapter_dir, _ = tiny
    for flags, message in [
        (["--model", model_dir], "saved with another AHN configuration: buffer_slots=2 (this model: 0)"),
        (["--model", model_dir, "--adapter", adapter_dir, "--window", "8"], "window=16 (this model: 8)"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(["generate", *flags, "--state", str(state), "--input", str(tmp_path / "a.txt"), "--no-progress"])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_help_matches_the_code(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    p = next(a for a in build_parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict)).choices
    text = p["generate"].format_help()
    assert "examples:\n  ahn generate" in text and f"(default: {DEFAULT_CHUNK})" in text
    assert p["generate"].get_default("chunk") == DEFAULT_CHUNK


def test_stream_benchmark_runs_at_small_sizes(capsys):
    from ahn.benchmarks import stream

    rows = stream.main(["--lengths", "300", "900", "--chunk", "256", "--threads", "1"])
    out = capsys.readouterr().out
    assert [r["tokens"] for r in rows] == [300, 900] and rows[0]["state_bytes"] == rows[1]["state_bytes"]
    assert re.search(r"^\| 900 \| .* \| [\d,]+ B \|$", out, re.M), out


def test_a_state_read_without_an_adapter_continues_in_another_process(tiny, tmp_path, capsys):
    """Issue 25.11: without --adapter the fresh memory is drawn from a fixed seed, so a state saved by one command
    continues in the next (each process starts from its own random state: reseeded here between the commands)."""
    model_dir = tiny[0]
    (tmp_path / "book.txt").write_text("the quick brown fox\n" * 4)
    (tmp_path / "q.txt").write_text("What did the fox do?\n")
    state = tmp_path / "s.state"
    flags = ["generate", "--model", model_dir, "--no-progress", "--chunk", "32", "--window", str(WINDOW), "--sinks",
             str(SINKS)]
    torch.manual_seed(11)
    assert main([*flags, "--input", str(tmp_path / "book.txt"), "--save-state", str(state),
                 "--max-new-tokens", "0"]) == 0
    torch.manual_seed(12)
    assert main([*flags, "--state", str(state), "--input", str(tmp_path / "q.txt"), "--max-new-tokens", "4"]) == 0
    assert "tokens in the state" in capsys.readouterr().err
    assert torch.initial_seed() == 12  # the caller's random state is its own
