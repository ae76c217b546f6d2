"""Examples for the text teacher and its evaluation: language modelling, RULER-style needles, word-pair recall.

Every generator returns a :class:`TextExample` of exactly the requested ``length`` tokens (BOS first), so a
batch is a plain stack. Randomness comes only from the ``rng`` passed in (a :class:`random.Random`), so a seed
fixes every example. The haystack is a 1-D sequence of token ids (:func:`token_stream` of some essays): the
teacher trains on the training essays, the evaluation must draw haystacks from the held-out ones.

- :func:`lm_example`: a window of the haystack; loss on every token.
- :func:`needle_example`: RULER's needle-in-a-haystack ("One of the special magic numbers for {key} is:
  {number}." sentences inserted at sentence boundaries, a question at the end); kinds "single", "multikey"
  (distractor needles with other keys), "multivalue" (one key, several numbers, all asked for) and "multiquery"
  (several keys asked for at once). Loss on the answer tokens.
- :func:`recall_example`: associative recall whose keys and values are ordinary words of the essays ("The word
  for {key} is {value}." sentences scattered in essay text, queries of the same form at the end), so relevant
  tokens cannot be told from filler by their ids. Loss on the answer words.

For evaluation an example carries ``prompt_len`` (the model reads ``input_ids[:prompt_len]`` and must produce
``answer_ids`` = ``input_ids[prompt_len:]``; teacher-forced argmax over those positions equals greedy decoding
when every token is right) and the token spans of what must be retrieved (``needle_spans``, ``value_spans``),
from which the distance of each needle to the question follows (is it beyond a window of W tokens?).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ahn.demo.text import corpus

IGNORE_INDEX = -100  # labels that carry no loss (transformers' default ignore_index)
NEEDLE_KINDS = ("single", "multikey", "multivalue", "multiquery")
NUMBER_DIGITS = 7  # RULER draws 7-digit magic numbers
NUM_NEEDLES = 4  # needles per multi-key / multi-value / multi-query example (RULER's defaults are 4)
NEEDLE = " One of the special magic numbers for {key} is: {value}."
QUESTION = " What is the special magic number for {key} mentioned in the provided text? The special magic number for {key} is:"
QUESTION_ALL = (" What are all the special magic numbers for {key} mentioned in the provided text? The special magic "
                "numbers for {key} are:")
PAIR = " The word for {key} is {value}."
RECALL_QUESTION = " The word for {key} is"
SENTENCE_END = re.compile(r"[.?!][\"')]?$")  # a token that ends a sentence (when the next one starts with a space)


@dataclass
class TextExample:
    """One example of exactly ``len(input_ids)`` tokens.

    ``labels``: ``IGNORE_INDEX`` except where the loss is (aligned with ``input_ids``: transformers shifts).
    ``prompt_len``: what the model reads before it must answer; ``answer_ids == input_ids[prompt_len:]``.
    ``answers``: the answer strings (numbers or words) in the order they are asked for.
    ``needle_spans``: [start, end) token spans of the inserted sentences that hold the answers (needles or
    queried pairs), in the order of ``answers``; ``value_spans``: the spans of their values (the number / word
    tokens) inside them. ``answer_spans``: where each answer is produced (recall: one span per query; needles: one
    span, the whole answer). ``distractor_spans``: inserted sentences that do not answer the question (multikey
    needles, unqueried pairs).
    """

    kind: str
    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    answers: list[str] = field(default_factory=list)
    needle_spans: list[tuple[int, int]] = field(default_factory=list)
    value_spans: list[tuple[int, int]] = field(default_factory=list)
    distractor_spans: list[tuple[int, int]] = field(default_factory=list)
    answer_spans: list[tuple[int, int]] = field(default_factory=list)
    depth: Optional[float] = None

    @property
    def answer_ids(self) -> list[int]:
        return self.input_ids[self.prompt_len:]

    def distances(self) -> list[int]:
        """For each needle (``value_spans`` order), the tokens from its value's last token to the token that
        predicts the first token of its answer: the needle lies beyond a window of W tokens (sinks aside) when
        its distance >= W."""
        per_answer = len(self.answer_spans) == len(self.value_spans)
        return [(self.answer_spans[j][0] if per_answer else self.prompt_len) - end
                for j, (_, end) in enumerate(self.value_spans)]


def collate(examples: Sequence[TextExample]) -> dict:
    """``input_ids`` and ``labels`` ``[B, T]`` long tensors of examples of one length."""
    lengths = {len(e.input_ids) for e in examples}
    if len(lengths) != 1:
        raise ValueError(f"examples of different lengths {sorted(lengths)}: batch examples of one length")
    return {"input_ids": torch.tensor([e.input_ids for e in examples], dtype=torch.long),
            "labels": torch.tensor([e.labels for e in examples], dtype=torch.long)}


def token_stream(tokenizer, texts: Sequence[str], separator: str = "\n\n") -> torch.Tensor:
    """The texts (e.g. cleaned essays, in a fixed order) tokenized and concatenated with ``separator``: ``[N]`` long."""
    ids = tokenizer(separator.join(texts), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def single_token_words(tokenizer, texts: Sequence[str], min_count: int = 3, min_chars: int = 3) -> list[str]:
    """Lower-case alphabetic words of ``texts`` seen at least ``min_count`` times whose " word" is one token of
    ``tokenizer``, sorted: the key / value pool of recall (and the needles' keys), made of the essays' own words."""
    counts: dict[str, int] = {}
    for text in texts:
        for w in re.findall(r"\b[a-z]+\b", text):
            counts[w] = counts.get(w, 0) + 1
    words = sorted(w for w, c in counts.items() if c >= min_count and len(w) >= min_chars)
    return [w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]


TASK_WORDS = 246  # the key / value pool's size: with the ten digits, the text teacher's 256 drill ids


def task_words(tokenizer, texts: Sequence[str], n: int = TASK_WORDS, seed: int = 0) -> list[str]:
    """The key / value pool of recall and the needles' keys: ``n`` of :func:`single_token_words` of ``texts`` (a
    fixed random sample, ``seed``; all of them if there are fewer), sorted.

    A fixed pool, not every word: the small text teacher learns to copy the ids it was drilled on and no others
    (:mod:`ahn.demo.text.teacher`), so it is drilled on this pool's ids, and the pool it was trained with is saved
    beside it (``training.json``'s ``task_words``) for every evaluation to draw from. Its words are ordinary
    words that the essays use around the needles and pairs too: they cannot be told from the text by their ids."""
    words = single_token_words(tokenizer, texts)
    return sorted(random.Random(seed).sample(words, n)) if len(words) > n else words


def recall_capacity(tokenizer, words: Sequence[str], length: int, queries: int = 16) -> int:
    """The most word pairs a :func:`recall_example` of ``length`` tokens holds (BOS, one sentence per pair, up to
    ``queries`` queries with their values) with at least 8 tokens of essay text left, as ``tokenizer`` counts
    them (the longest sentence and query of the first 20 ``words``)."""
    probe = list(words[:20])
    if not probe:
        return 0
    pair = max(len(_encode(tokenizer, PAIR.format(key=w, value=w))) for w in probe)
    query = max(len(_encode(tokenizer, RECALL_QUESTION.format(key=w) + f" {w}.")) for w in probe)
    p = 0
    while 1 + (p + 1) * pair + min(p + 1, queries) * query <= length - 8:
        p += 1
    return p


def essay_data(tokenizer, split: str = "heldout") -> tuple[torch.Tensor, list[str]]:
    """(haystack, words) of the essays of ``split`` (:func:`ahn.demo.text.corpus.essays`, fetched on first use):
    their :func:`token_stream` (cleaned, in name order) and their :func:`single_token_words`. The evaluation
    uses "heldout"; the teacher and the memories train on "train"."""
    texts = [corpus.clean(t) for t in corpus.essays(split).values()]
    return token_stream(tokenizer, texts), single_token_words(tokenizer, texts)


def magic_number(rng: random.Random, digits: int = NUMBER_DIGITS) -> str:
    """A random ``digits``-digit number without a leading zero."""
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _filler(haystack: torch.Tensor, n: int, rng: random.Random) -> list[int]:
    if n < 0:
        raise ValueError(f"the inserted text and question take {-n} tokens more than the length: ask for a longer length")
    if len(haystack) < n:
        raise ValueError(f"a haystack of {len(haystack)} tokens is shorter than the {n} filler tokens asked for")
    start = rng.randrange(len(haystack) - n + 1)
    return haystack[start:start + n].tolist()


def _boundaries(tokenizer, filler: list[int]) -> list[int]:
    """Positions i (0..len) of ``filler`` where a sentence may be inserted before filler[i]: after a token that
    ends a sentence and before one that starts with white space (or at either end)."""
    text = [tokenizer.convert_tokens_to_string([t]) for t in tokenizer.convert_ids_to_tokens(filler)]
    inner = [i for i in range(1, len(filler)) if SENTENCE_END.search(text[i - 1]) and text[i][:1].isspace()]
    return [0] + inner + [len(filler)]


def _snap(boundaries: list[int], target: int) -> int:
    return min(boundaries, key=lambda b: (abs(b - target), b))


def _assemble(tokenizer, filler: list[int], inserts: list[tuple[int, list[int], list[int], Optional[int]]],
              tail: list[int], answer: list[int], kind: str, answers: list[str], depth: Optional[float]) -> TextExample:
    """BOS + filler with ``inserts`` = (filler position, sentence ids, value ids, index of the answer it holds or
    None) placed before those positions (stable for equal positions) + ``tail`` (the question) + ``answer``."""
    ids = [tokenizer.bos_token_id]
    needles, values, distractors = {}, {}, []
    order = sorted(range(len(inserts)), key=lambda j: (inserts[j][0], j))
    prev = 0
    for j in order:
        pos, sentence, value, relevant = inserts[j]
        ids += filler[prev:pos]
        prev = pos
        start = len(ids)
        ids += sentence
        span = (start, len(ids))
        if relevant is None:
            distractors.append(span)
        else:
            needles[relevant] = span
            offset = _find(sentence, value)
            values[relevant] = (start + offset, start + offset + len(value))
    ids += filler[prev:] + tail
    prompt_len = len(ids)
    ids += answer
    labels = [IGNORE_INDEX] * prompt_len + list(answer)
    return TextExample(kind, ids, labels, prompt_len, answers, [needles[j] for j in sorted(needles)],
                       [values[j] for j in sorted(values)], distractors, [(prompt_len, len(ids))], depth)


def _find(seq: list[int], sub: list[int]) -> int:
    for i in range(len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    raise AssertionError("a value's tokens are not inside its sentence (tokenization changed at the boundary)")


def _value_ids(tokenizer, sentence: str, value: str) -> tuple[list[int], list[int]]:
    """The sentence's ids and the ids of ``value`` (with its leading space) as they appear inside it."""
    ids = _encode(tokenizer, sentence)
    return ids, _encode(tokenizer, " " + value)


def lm_example(haystack: torch.Tensor, length: int, rng: random.Random, bos_token_id: int) -> TextExample:
    """BOS + a random window of ``length - 1`` haystack tokens; the loss on every token but BOS."""
    ids = [bos_token_id] + _filler(haystack, length - 1, rng)
    return TextExample("lm", ids, [IGNORE_INDEX] + ids[1:], prompt_len=length)


def needle_example(tokenizer, haystack: torch.Tensor, length: int, depth: float, kind: str, rng: random.Random,
                   keys: Sequence[str], num_needles: int = NUM_NEEDLES) -> TextExample:
    """A RULER-style needle example of ``length`` tokens over a haystack window.

    ``depth`` in [0, 1]: where the first answering needle sits in the filler (0 = just after BOS, 1 = just before
    the question), snapped to the nearest sentence boundary; the other needles of "multikey" (distractors),
    "multivalue" and "multiquery" sit at uniform random depths. ``keys``: the pool the needles' keys are drawn
    from (e.g. :func:`single_token_words`). ``num_needles`` applies to the multi kinds ("single" has one).
    Answers are ``NUMBER_DIGITS``-digit numbers; a multi-answer is " n1, n2, ..." in the order asked.
    """
    if kind not in NEEDLE_KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {', '.join(NEEDLE_KINDS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth!r} must lie in [0, 1] (a fraction of the haystack)")
    n = 1 if kind == "single" else num_needles
    if kind == "multivalue":
        key_list = [rng.choice(keys)] * n
    else:
        key_list = rng.sample(list(keys), n)
    numbers = [magic_number(rng) for _ in range(n)]
    asked = list(range(n)) if kind in ("multivalue", "multiquery") else [0]
    sentences = [_value_ids(tokenizer, NEEDLE.format(key=k, value=v), v) for k, v in zip(key_list, numbers)]
    if kind == "multiquery":
        keys_text = ", ".join(key_list[:-1]) + " and " + key_list[-1]
        question = QUESTION_ALL.format(key=keys_text)
    elif kind == "multivalue":
        question = QUESTION_ALL.format(key=key_list[0])
    else:
        question = QUESTION.format(key=key_list[0])
    answers = [numbers[i] for i in asked]
    answer = _encode(tokenizer, " " + ", ".join(answers))
    tail = _encode(tokenizer, question)
    used = 1 + sum(len(s) for s, _ in sentences) + len(tail) + len(answer)
    filler = _filler(haystack, length - used, rng)
    bounds = _boundaries(tokenizer, filler)
    depths = [depth] + [rng.random() for _ in range(n - 1)]
    if kind in ("multivalue", "multiquery"):  # the answer lists values in the order of their needles
        order = sorted(range(n), key=lambda i: (depths[i], i))
        depths = [depths[i] for i in order]
    inserts = [(_snap(bounds, round(d * len(filler))), s, v, asked.index(i) if i in asked else None)
               for i, (d, (s, v)) in enumerate(zip(depths, sentences))]
    return _assemble(tokenizer, filler, inserts, tail, answer, kind, answers, depth)


def recall_example(tokenizer, words: Sequence[str], num_pairs: int, length: int, rng: random.Random,
                   haystack: torch.Tensor, num_queries: Optional[int] = None,
                   spread: tuple[float, float] = (0.0, 1.0)) -> TextExample:
    """Associative recall of ``num_pairs`` word pairs scattered in essay text, ``length`` tokens in all.

    Keys and values are distinct words of ``words`` (e.g. :func:`single_token_words` of the essays, one token
    each), stated as " The word for {key} is {value}." at random sentence boundaries between the fractions
    ``spread`` of the filler; then ``num_queries`` (default min(num_pairs, 16)) queries " The word for {key} is"
    for distinct random keys, each followed by its value (the loss is on the values). ``prompt_len`` ends before
    the first value asked; ``answers`` lists the values in query order; ``needle_spans`` / ``value_spans`` /
    ``answer_spans`` are the queried pairs' spans in query order (so :meth:`TextExample.distances` is per query);
    unqueried pairs are ``distractor_spans``. A query is right when every token of its ``answer_spans`` is.
    """
    if not isinstance(num_pairs, int) or num_pairs < 1 or 2 * num_pairs > len(words):
        raise ValueError(f"num_pairs={num_pairs!r} must be an int in [1, {len(words) // 2}] (two distinct words a pair)")
    lo, hi = spread
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"spread={spread!r} must be two fractions 0 <= lo <= hi <= 1")
    q = min(num_pairs, 16) if num_queries is None else num_queries
    if not 1 <= q <= num_pairs:
        raise ValueError(f"num_queries={num_queries!r} must lie in [1, num_pairs={num_pairs}]")
    chosen = rng.sample(list(words), 2 * num_pairs)
    keys, values = chosen[:num_pairs], chosen[num_pairs:]
    sentences = [_value_ids(tokenizer, PAIR.format(key=k, value=v), v) for k, v in zip(keys, values)]
    queried = rng.sample(range(num_pairs), q)
    labels_mask = []
    questions = []
    for i in queried:
        question = _encode(tokenizer, RECALL_QUESTION.format(key=keys[i]))
        value = _encode(tokenizer, " " + values[i])
        questions.append((question, value))
    first_question = questions[0][0]
    rest, spans = [], []
    for j, (question, value) in enumerate(questions):
        if j:
            rest += question
            labels_mask += [False] * len(question)
        spans.append((len(rest), len(rest) + len(value)))
        rest += value
        labels_mask += [True] * len(value)
        rest_end = _encode(tokenizer, ".")
        rest += rest_end
        labels_mask += [False] * len(rest_end)
    used = 1 + sum(len(s) for s, _ in sentences) + len(first_question) + len(rest)
    filler = _filler(haystack, length - used, rng)
    bounds = [b for b in _boundaries(tokenizer, filler) if lo * len(filler) <= b <= hi * len(filler)]
    if not bounds:
        bounds = [round(lo * len(filler))]
    inserts = [(rng.choice(bounds), s, v, queried.index(i) if i in queried else None)
               for i, (s, v) in enumerate(sentences)]
    ex = _assemble(tokenizer, filler, inserts, first_question, rest, "recall", [values[i] for i in queried], None)
    ex.labels = [IGNORE_INDEX] * ex.prompt_len + [t if m else IGNORE_INDEX for t, m in zip(rest, labels_mask)]
    ex.answer_spans = [(ex.prompt_len + a, ex.prompt_len + b) for a, b in spans]
    return ex
