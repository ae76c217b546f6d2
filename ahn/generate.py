"""Reading a text of any length into an AHN model, and generating after it: ``ahn generate``.

Memory stays bounded however long the text is:

* **the text** is read in blocks of :data:`READ_BYTES` and tokenized in pieces of up to about
  :data:`PIECE_CHARS` characters, each cut at a line start (after a line break, before a
  character that is not a space) or a word start (before the last space or tab of a run), so
  indented lines and lines ended by a lone CR are cut too. A cut is taken only where
  :func:`cuts_exactly` shows on the text around it that the tokenizer's ids do not span it, so
  the pieces' ids are exactly the ids of the whole text (byte-level BPE tokenizers: Qwen,
  Llama 3, GPT-2, ...). A tokenizer that fails :func:`splits_at_line_starts` on a probe text
  (SentencePiece-style ones, which prepend a space to each call's text) gets the whole text at
  once, exact but in memory; so does a text with no place to cut (no space or line break).
* **the model** reads the ids in forward calls of ``chunk`` tokens (:func:`read`), and keeps only
  the :class:`ahn.AHNCache` (sinks + window + memory state) and the last token's logits.

Bit-exact continuation. Reading A, saving the cache (:meth:`ahn.AHNCache.save`), loading it and
reading B computes the same floats as reading A and then B into one cache, because both make the
same forward calls: :func:`read` cuts every input into chunks counted from that input's own first
token. A single read of the concatenated ids A + B makes the same calls only when len(A) is a
multiple of ``chunk``; otherwise its chunks straddle the boundary and the results agree to float
rounding, not bit for bit (the memory's chunkwise kernel and the attention blocks sum in another
order). Texts tokenized apart also differ from their concatenation tokenized at once where a
token would span the seam.
"""

from __future__ import annotations

import codecs
import functools
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from safetensors import SafetensorError
from tqdm import tqdm
from transformers import TextStreamer

from ahn._loading import load_causal_lm, load_tokenizer
from ahn._progress import library_progress
from ahn.cache import AHNCache
from ahn.config import AHNConfig
from ahn.model import AHNModel, add_memory, cache_kwargs
from ahn.state import read_metadata, writable_target

# Seed of a fresh (untrained) memory's initialisation when `ahn generate` runs without --adapter.
FRESH_MEMORY_SEED = 0

READ_BYTES = 1 << 16  # bytes read from the input per call
PIECE_CHARS = 1 << 16  # characters tokenized per call (about: a piece ends at a line start)
DEFAULT_CHUNK = 4096  # tokens per forward call while reading
# A text with the line kinds that matter to pre-tokenizers: spaces, runs of them, blank and indented lines,
# tabs, digits, CJK and punctuation at a line start.
PROBE_TEXT = ("Alpha beta, gamma.\nSecond line:  two  spaces\n\n  indented\n\ttabbed\n数字 123 and 4567.\n(end) "
              "don't\nlast")
# Stands for the user's text while the chat template is rendered (a private-use character: no template alters it).
CHAT_PLACEHOLDER = "\ue000ahn-input\ue000"
_LINE_START = re.compile(r"\n(?=\S)")
# Where the text may be cut: after a line break ("\n" or a lone "\r") before a character that is not a space,
# or before the last space or tab of a run followed by one (a word start, an indented line's text).
_CUT = re.compile(r"(?<=[\r\n])(?=\S)|(?=[^\S\r\n]\S)")
CUT_TRIES = 8  # cut places checked per attempt to end a piece
CUT_SEARCH = 4096  # characters searched for cut places at a time, backwards from the end
CUT_CONTEXT = 256  # characters on each side of a cut that must tokenize alike cut and whole


# ----------------------------------------------------------------------------- text
class TextInput:
    """The text named by ``--input``: a UTF-8 file, or ``-`` for standard input, read in blocks.

    Opening it reads and checks its first block, before any model is loaded: a missing file, a
    folder, binary content (a NUL byte, or bytes that are not UTF-8) and an empty input (nothing
    but whitespace) are ValueErrors naming it and the fix. Later blocks are checked as they are
    read. Use as a context manager; :meth:`blocks` yields the decoded text once.
    """

    def __init__(self, spec: str, block_bytes: int = READ_BYTES):
        self.spec, self.block_bytes = spec, block_bytes
        self.size: Optional[int] = None  # bytes, when known (a file)
        if spec == "-":
            self.name, self._stream = "- (standard input)", sys.stdin.buffer
        else:
            path = Path(spec)
            self.name = spec
            if not path.exists():
                raise ValueError(f"--input {spec}: no such file; give a text file, or - to read standard input")
            if path.is_dir():
                raise ValueError(f"--input {spec} is a folder; give a text file")
            self._stream, self.size = open(path, "rb"), path.stat().st_size
        self._decoder = codecs.getincrementaldecoder("utf-8-sig")("strict")  # a BOM at the start is dropped
        self.bytes_read, self._eof, self._has_text = 0, False, False
        try:
            self._first = self._next()
        except BaseException:
            self.close()
            raise
        if self._eof and not self._has_text:
            self.close()
            raise ValueError(f"--input {self.name} is empty (no text, or only whitespace); give a file with text")

    def _next(self) -> str:
        raw = self._stream.read(self.block_bytes)
        start = self.bytes_read
        self.bytes_read += len(raw)
        self._eof = not raw
        nul = raw.find(b"\0")  # in UTF-8 a zero byte is only ever the NUL character
        if nul >= 0:
            raise ValueError(f"--input {self.name} is a binary file (a NUL byte at byte {start + nul:,}); give a "
                             "UTF-8 text file")
        try:
            text = self._decoder.decode(raw, final=self._eof)
        except UnicodeDecodeError as e:
            at = self.bytes_read - len(e.object) + e.start  # e.object: this block and the bytes the decoder held back
            raise ValueError(f"--input {self.name} is not UTF-8 text (byte {at:,} cannot be decoded: "
                             f"{e.object[e.start:e.start + 1].hex()}); give a UTF-8 text file (convert others with "
                             "iconv -t UTF-8)") from None
        self._has_text = self._has_text or bool(text.strip())
        return text

    def blocks(self) -> Iterator[str]:
        """The decoded text, block by block (once)."""
        yield self._first
        while not self._eof:
            yield self._next()
        if not self._has_text:
            raise ValueError(f"--input {self.name} is empty (no text, or only whitespace); give a file with text")

    def close(self) -> None:
        if self._stream is not sys.stdin.buffer:
            self._stream.close()

    def __enter__(self) -> "TextInput":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def line_pieces(blocks: Iterable[str], piece_chars: int = PIECE_CHARS,
                exact: Optional[Callable[[str, int], bool]] = None) -> Iterator[str]:
    """Regroup text blocks into pieces cut at line or word starts (:data:`_CUT`: after a line break before a
    character that is not a space, or before the last space or tab of a run that precedes one). Once
    ``piece_chars`` characters are pending, they are cut at the last such place (with :data:`CUT_CONTEXT`
    characters after it) where ``exact(text, i)`` accepts a cut of ``text`` at ``i`` (default: any), trying
    at most :data:`CUT_TRIES` places; the final piece is the rest. The pieces concatenate to the text. The
    search runs backwards from the end and never returns below where an earlier one stopped, so each character
    is searched about once (linear time); memory holds about ``piece_chars`` characters plus a block, unless no
    place is accepted (a text with no space or line break, or a tokenizer that fails every check)."""
    pending, floor = "", 1  # places below floor were searched already (0 is no cut)
    for block in blocks:
        pending += block
        if len(pending) < piece_chars:
            continue
        limit = hi = len(pending) - CUT_CONTEXT  # a place needs CUT_CONTEXT characters after it
        cut, tries = 0, 0
        while not cut and tries < CUT_TRIES and hi > floor:
            lo = max(floor, hi - CUT_SEARCH)
            places = [m.start() for m in _CUT.finditer(pending, lo, hi + 1) if m.start() < hi]
            for i in reversed(places[-(CUT_TRIES - tries):]):
                tries += 1
                if exact is None or exact(pending, i):
                    cut = i
                    break
            hi = lo
        floor = max(floor, limit)
        if cut:
            yield pending[:cut]
            pending, floor = pending[cut:], max(floor - cut, 1)
    if pending:
        yield pending


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def cuts_exactly(tokenizer, text: str, i: int) -> bool:
    """Whether cutting ``text`` at ``i`` keeps the ids: the :data:`CUT_CONTEXT` characters on each side, tokenized
    apart, give the ids of the two together (the pre-tokens around the cut do not span it)."""
    left, right = text[max(i - CUT_CONTEXT, 0): i], text[i: i + CUT_CONTEXT]
    return _encode(tokenizer, left) + _encode(tokenizer, right) == _encode(tokenizer, left + right)


def splits_at_line_starts(tokenizer) -> bool:
    """Whether ``tokenizer`` gives a text cut at any line start the ids of the whole text (:data:`PROBE_TEXT`): a
    quick test of whether cutting is worth trying at all (each cut is still checked, :func:`cuts_exactly`)."""
    whole = _encode(tokenizer, PROBE_TEXT)
    return all(_encode(tokenizer, PROBE_TEXT[: m.end()]) + _encode(tokenizer, PROBE_TEXT[m.end():]) == whole
               for m in _LINE_START.finditer(PROBE_TEXT))


def special_prefix(tokenizer) -> list[int]:
    """The special tokens ``tokenizer`` puts before a text (a BOS, or nothing). Special tokens it appends
    (an EOS) are left out: the model continues the text."""
    plain = _encode(tokenizer, "a")
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    k = next(i for i in range(len(full) - len(plain) + 1) if full[i: i + len(plain)] == plain)
    return full[:k]


def chat_frame(tokenizer) -> tuple[str, str]:
    """The text the tokenizer's chat template puts before and after one user message (the generation prompt
    included), so that the message can be streamed between them."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("--chat: the model's tokenizer has no chat template; leave out --chat to read the text as "
                         "it is")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_PLACEHOLDER}], tokenize=False,
                                             add_generation_prompt=True)
    if rendered.count(CHAT_PLACEHOLDER) != 1:
        raise ValueError("--chat: the tokenizer's chat template alters the message text, so the input cannot be "
                         "streamed through it; leave out --chat and format the input in the file")
    head, tail = rendered.split(CHAT_PLACEHOLDER)
    return head, tail


def token_pieces(tokenizer, blocks: Iterable[str], chat: bool = False,
                 piece_chars: int = PIECE_CHARS, start: bool = True) -> Iterator[list[int]]:
    """Token ids of a text given in blocks, piece by piece (see the module docstring): the ids of the whole
    text with the tokenizer's leading special tokens, or with ``chat`` the ids of the text as one user turn
    of the chat template (with its generation prompt), as ``apply_chat_template`` would give them.
    ``start=False``: the text continues a stream (a saved state), so the special prefix that belongs to the
    start of a stream (a BOS, also where the chat template writes it) is left out."""
    if chat:
        head, tail = chat_frame(tokenizer)
        bos = getattr(tokenizer, "bos_token", None)
        if not start and bos and head.startswith(bos):
            head = head[len(bos):]
        blocks = _framed(head, blocks, tail)
    elif start:
        yield special_prefix(tokenizer)
    pieces = line_pieces(blocks, piece_chars, exact=lambda text, i: cuts_exactly(tokenizer, text, i))
    if not splits_at_line_starts(tokenizer):
        pieces = iter(["".join(pieces)])
    for piece in pieces:
        yield _encode(tokenizer, piece)


def _framed(head: str, blocks: Iterable[str], tail: str) -> Iterator[str]:
    yield head
    yield from blocks
    yield tail


# ----------------------------------------------------------------------------- model
@torch.no_grad()
def read(model, ids: Iterable[Sequence[int]], cache: AHNCache, chunk: int = DEFAULT_CHUNK,
         progress: Optional[Callable[[int], None]] = None) -> Optional[torch.Tensor]:
    """Feed token ids (one sequence, given in pieces of any size) into ``cache``.

    The model runs on chunks of exactly ``chunk`` tokens counted from the first id (the last chunk
    may be shorter), whatever the pieces, and keeps the logits of the last token only.
    ``progress(n)`` is called after each chunk of n tokens. Returns the last token's logits
    ``[1, vocab]`` (float32), or None when there were no ids.
    """
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    device = next(model.parameters()).device
    pending: list[int] = []
    logits = None

    def forward(part: list[int]) -> torch.Tensor:
        x = torch.tensor([part], dtype=torch.long, device=device)  # [1, n]
        out = model(x, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        if progress is not None:
            progress(len(part))
        return out.logits[:, -1].float()

    for piece in ids:
        pending.extend(int(i) for i in piece)
        while len(pending) >= chunk:
            logits = forward(pending[:chunk])
            del pending[:chunk]
    if pending:
        logits = forward(pending)
    return logits


@torch.no_grad()
def greedy(model, cache: AHNCache, logits: torch.Tensor, max_new_tokens: int,
           eos_token_ids: Sequence[int] = ()) -> Iterator[int]:
    """Greedy continuation after a :func:`read`: yields up to ``max_new_tokens`` token ids, stopping after an
    EOS. ``logits``: ``[1, vocab]``, the last token's. Each yielded token but the last is fed into ``cache``."""
    device = next(model.parameters()).device
    for i in range(max_new_tokens):
        token = int(logits.argmax(-1))
        yield token
        if token in eos_token_ids or i == max_new_tokens - 1:
            return
        x = torch.tensor([[token]], dtype=torch.long, device=device)  # [1, 1]
        logits = model(x, **cache_kwargs(model, cache), use_cache=True).logits[:, -1].float()


# ----------------------------------------------------------------------------- the command
def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for value in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        ids.update(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
    return ids


def _load(args):
    """(AHNModel, tokenizer) for the command's --model / --adapter / --window / --sinks / --dtype / --device."""
    dtypes = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    window, sinks = args.window, args.sinks
    if args.state is not None and (window is None or sinks is None):  # continue with the state's window and sinks
        saved = read_metadata(args.state)["fingerprint"]["ahn_config"]
        window = saved["window"] if window is None else window
        sinks = saved["sinks"] if sinks is None else sinks
    overrides = {k: v for k, v in (("window", window), ("sinks", sinks)) if v is not None}
    with library_progress(not args.no_progress):
        tokenizer = load_tokenizer(args.model)
        base = load_causal_lm(args.model, dtype=dtypes[args.dtype]).to(args.device).eval()
    if args.adapter:
        return AHNModel.from_pretrained(base, args.adapter, **overrides), tokenizer
    # A fresh memory (no adapter) is drawn from a fixed seed, so that a state saved by one process continues in
    # another (its fingerprint holds the memory's weights); the caller's random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(FRESH_MEMORY_SEED)
        return add_memory(base, AHNConfig(**overrides)), tokenizer


def _can_create_in(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tried: permission bits do not bind root, an immutable flag or a
    read-only mount do)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _check_paths(args) -> None:
    """Refuse unusable --state / --save-state / --device before anything is read or loaded."""
    if args.state is not None:
        if not Path(args.state).exists():
            raise ValueError(f"--state {args.state}: no such file; give a state written by --save-state")
        read_metadata(args.state)
    if args.save_state is not None:
        target = Path(args.save_state)
        if target.is_dir():
            raise ValueError(f"--save-state {target} is a folder; give a file name")
        if not target.parent.is_dir():
            raise ValueError(f"--save-state {target}: the folder {str(target.parent)!r} does not exist; create it or "
                             "choose another path")
        try:
            real = writable_target(target)  # a symlink's target; a device or a pipe is refused
        except ValueError as e:
            raise ValueError(f"--save-state {target}: {e}") from None
        if not _can_create_in(real.parent):
            raise ValueError(f"--save-state {target}: the folder {str(real.parent)!r} is not writable; choose a folder "
                             "you can write to")
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as e:  # AssertionError: a torch build without CUDA
        raise ValueError(f"--device {args.device!r} cannot be used here ({e}); use --device cpu") from None


def _exit_130_on_ctrl_c(command: Callable[..., int]) -> Callable[..., int]:
    """Ctrl-C stops ``command`` with a message and exit status 130 instead of a traceback."""

    @functools.wraps(command)
    def run(*args, **kwargs) -> int:
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            print("\nahn generate: interrupted (Ctrl-C); a --save-state file is written whole or not at all, so an "
                  "existing one is intact", file=sys.stderr)
            return 130

    return run


@_exit_130_on_ctrl_c
def run(args) -> int:
    """``ahn generate``: read ``--input`` (after ``--state``), optionally save the state, then generate greedily."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_paths(args)
    with TextInput(args.input) as text:
        model, tokenizer = _load(args)
        cache = AHNCache.load(args.state, model) if args.state else model.new_cache()
        start = cache.get_seq_length()
        with tqdm(desc="reading", unit="tok", unit_scale=True, disable=args.no_progress, file=sys.stderr,
                  dynamic_ncols=True) as bar:

            def progress(n: int) -> None:
                bar.update(n)
                done = f"{100 * text.bytes_read / text.size:.0f}% of input, " if text.size else ""
                bar.set_postfix_str(f"{done}cache {cache.nbytes / 2**20:.2f} MiB", refresh=False)

            t0 = time.perf_counter()
            ids = token_pieces(tokenizer, text.blocks(), chat=args.chat, start=args.state is None)
            logits = read(model, ids, cache, args.chunk, progress)
    seconds = time.perf_counter() - t0
    n = cache.get_seq_length() - start
    print(f"read {n:,} tokens in {seconds:.1f} s ({n / max(seconds, 1e-9):,.0f} tokens/s); {cache.get_seq_length():,} "
          f"tokens in the state; cache {cache.nbytes / 2**20:.2f} MiB ({cache.kv_length} KV entries per layer)",
          file=sys.stderr)
    if args.save_state:
        try:
            cache.save(args.save_state)
        except (OSError, SafetensorError) as e:
            kept = " (the old state is kept)" if Path(args.save_state).exists() else ""
            raise ValueError(f"--save-state {args.save_state}: the state could not be written ({e}){kept}; free some "
                             "space or choose another path, then run again") from None
        size = Path(args.save_state).stat().st_size
        print(f"state saved to {args.save_state} ({size / 2**20:.2f} MiB)", file=sys.stderr)
    if args.max_new_tokens:
        streamer = TextStreamer(tokenizer, skip_special_tokens=True)
        t0, count = time.perf_counter(), 0
        for token in greedy(model, cache, logits, args.max_new_tokens, tuple(_eos_ids(model, tokenizer))):
            streamer.put(torch.tensor([token]))
            count += 1
        streamer.end()
        seconds = time.perf_counter() - t0
        print(f"generated {count} tokens in {seconds:.1f} s ({count / max(seconds, 1e-9):.1f} tokens/s)",
              file=sys.stderr)
    return 0
