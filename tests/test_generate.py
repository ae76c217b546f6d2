"""Streaming reads and ``ahn generate``: text pieces tokenize to the whole text's ids, the model's chunks do not
depend on how ids arrive, a saved read continued by a second command equals one run, bad input exits 2
naming the file; the streaming benchmark runs at small sizes."""

from __future__ import annotations

import io
import re
import sys
import time
from pathlib import Path

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
    for a, b in zip(pieces, pieces[1:]):  # cut at a line start, or before the last space or tab of a run
        assert len(a) < 100 + 37 and (a.endswith("\n") and not b[0].isspace() or b[0] in " \t" and not b[1].isspace())
    assert list(line_pieces(["x" * 500, "y" * 300], piece_chars=10)) == ["x" * 500 + "y" * 300]  # no place to cut


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


def gpt2_like_with_a_blank_line_merge() -> PreTrainedTokenizerFast:
    """Byte-level BPE with GPT-2's pre-tokenizer regex and one merge, "\\n\\n": a cut after a blank line before text
    splits the pre-token "\\n\\n" that the whole text has (GPT-2's regex keeps "\\n" + "\\n" apart only when text
    follows), so the pieces' ids differ from the whole text's there."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["ĊĊ"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ċ", "Ċ")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_pieces_are_cut_only_where_the_ids_are_exact():
    """Item 3 of issue 25: the probe text has no blank line followed by text, so it passed a tokenizer that a cut
    after a blank line breaks; every cut is now checked on the text around it."""
    tok = gpt2_like_with_a_blank_line_merge()
    assert splits_at_line_starts(tok)  # the quick probe still passes: it is not what makes the cuts exact
    text = "".join(f"Paragraph {i} says something.\n\n" for i in range(300))
    whole = tok(text)["input_ids"]
    pieces = list(token_pieces(tok, iter([text[i: i + 100] for i in range(0, len(text), 100)]), piece_chars=500))
    assert len(pieces) > 10 and sum(pieces, []) == whole


@pytest.mark.parametrize("line", ["    indented code();", "\t{\"key\": [1, 2]},", "a line ended by a lone CR\r",
                                  "\t  \tmixed indent", "x" * 40 + "\r"])
def test_indented_and_cr_only_lines_are_cut_into_bounded_pieces_in_linear_time(line):
    """Item 10 of issue 25: lines that all start with whitespace (pretty-printed JSON, indented code) or end with a
    lone CR were never cut (one piece, memory growing with the text), and each block rescanned every line break.
    Now they are cut (at the last space or tab of a run, after a lone CR), the ids stay exact, and the text is
    scanned once: 4 MiB is cut in well under a second."""
    sep = "" if line.endswith("\r") else "\n"
    text = "".join(f"{line}{sep}" for _ in range(2000))
    blocks = [text[i: i + 1000] for i in range(0, len(text), 1000)]
    tok = byte_tokenizer()
    pieces = list(token_pieces(tok, iter(blocks), piece_chars=4096))
    assert len(pieces) > 5 and sum(pieces, []) == tok(text)["input_ids"]
    text_pieces = list(line_pieces(iter(blocks), piece_chars=4096))
    assert "".join(text_pieces) == text and max(map(len, text_pieces)) < 4096 + 1000
    big = text * (4 * 2**20 // len(text))
    t0 = time.perf_counter()
    n = sum(1 for _ in line_pieces(iter([big[i: i + 2**16] for i in range(0, len(big), 2**16)])))
    assert n > 30 and time.perf_counter() - t0 < 2.0


def test_a_continued_read_has_no_second_bos(tiny, tmp_path, capsys):
    """Item 2 of issue 25: with a tokenizer that puts a BOS before every text (as Llama 3's does), the read continued
    from a state put a second BOS mid-stream; the special prefix belongs to the start of a stream only."""
    import shutil

    model_dir = tmp_path / "bos-model"
    shutil.copytree(tiny[0], model_dir)
    tok = byte_tokenizer()
    bos = tok.convert_tokens_to_ids("<|im_start|>")  # a token the model has: its BOS
    tok.bos_token = "<|im_start|>"
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                                         special_tokens=[("<|im_start|>", bos)])
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    tok.save_pretrained(model_dir)
    assert special_prefix(tok) == [bos]
    book, question = "the quick brown fox\n" * 15 + "the quick brown fox", "What did the fox do?\n"  # BOS + 319: 10 chunks
    for name, text in (("book.txt", book), ("question.txt", question), ("both.txt", book + question)):
        (tmp_path / name).write_text(text)
    run = ["generate", "--model", str(model_dir), "--adapter", tiny[1], "--no-progress", "--chunk", "32"]
    state = tmp_path / "book.state"
    assert main([*run, "--input", str(tmp_path / "book.txt"), "--save-state", str(state), "--max-new-tokens", "0"]) == 0
    assert "read 320 tokens" in capsys.readouterr().err
    assert main([*run, "--state", str(state), "--input", str(tmp_path / "question.txt"), "--max-new-tokens", "24"]) == 0
    continued = capsys.readouterr()
    assert main([*run, "--input", str(tmp_path / "both.txt"), "--max-new-tokens", "24"]) == 0
    once = capsys.readouterr()
    assert "read 21 tokens" in continued.err and "341 tokens in the state" in continued.err
    assert "341 tokens in the state" in once.err and continued.out == once.out
    blocks = [question]
    assert sum(token_pieces(tok, iter(blocks), chat=True, start=False), []) == \
        tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)["input_ids"][1:]


def test_state_that_is_a_device_is_not_called_a_folder(tiny, tmp_path, capsys):
    """Item 18 of issue 25: --state /dev/null said "is a folder"."""
    (tmp_path / "ok.txt").write_text("some text\n")
    with pytest.raises(SystemExit) as e:
        generate(capsys, tiny, "--input", str(tmp_path / "ok.txt"), "--state", "/dev/null")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "state file /dev/null is not a regular file" in err and "folder" not in err, err


def test_save_state_is_checked_before_reading_and_a_failed_write_keeps_the_old_state(tiny, tmp_path, capsys,
                                                                                       read_only_dir, monkeypatch):
    """Item 7 of issue 25: --save-state into a folder that cannot be written, or onto /dev/full, failed with a
    traceback only after the whole input was read; a full disk gave a SafetensorError traceback. Now the path is
    refused before anything is read, and a failed write says so and keeps the old state. A symlink is followed."""
    import ahn.generate as generate_module
    import ahn.state

    (tmp_path / "ok.txt").write_text("some text to read\n" * 4)
    read_calls = []
    monkeypatch.setattr(generate_module, "read", lambda *a, **k: read_calls.append(1))
    for target, message in [(read_only_dir / "s.state", f"the folder {str(read_only_dir)!r} is not writable"),
                            (Path("/dev/full"), "/dev/full is not a regular file")]:
        with pytest.raises(SystemExit) as e:
            generate(capsys, tiny, "--input", str(tmp_path / "ok.txt"), "--save-state", str(target))
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"--save-state {target}: " in err and message in err and "Traceback" not in err
    assert read_calls == []  # refused before the input was read
    monkeypatch.undo()
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link.state"
    link.symlink_to(real / "book.state")
    generate(capsys, tiny, "--input", str(tmp_path / "ok.txt"), "--save-state", str(link), "--max-new-tokens", "0")
    assert link.is_symlink() and (real / "book.state").is_file()
    old = (real / "book.state").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ahn.state, "save_file", disk_full)
    (tmp_path / "more.txt").write_text("more text\n")
    with pytest.raises(SystemExit) as e:
        generate(capsys, tiny, "--state", str(link), "--input", str(tmp_path / "more.txt"), "--save-state", str(link),
                 "--max-new-tokens", "0")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "the state could not be written" in err and "No space left on device" in err
    assert "the old state is kept" in err and "Traceback" not in err
    assert (real / "book.state").read_bytes() == old and link.is_symlink()


@pytest.mark.parametrize("where", ["read", "greedy"])
def test_ctrl_c_exits_130_with_a_message(tiny, tmp_path, capsys, monkeypatch, where):
    """Item 9 of issue 25: Ctrl-C during ``ahn generate`` printed a traceback."""
    import ahn.generate as generate_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate_module, where, interrupted)
    (tmp_path / "ok.txt").write_text("some text to read\n")
    model_dir, adapter_dir, _ = tiny
    assert main(["generate", "--model", model_dir, "--adapter", adapter_dir, "--no-progress", "--input",
                 str(tmp_path / "ok.txt"), "--max-new-tokens", "3", "--save-state", str(tmp_path / "s.state")]) == 130
    err = capsys.readouterr().err
    assert "ahn generate: interrupted (Ctrl-C)" in err and "Traceback" not in err
    assert (tmp_path / "s.state").exists() == (where == "greedy")


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
