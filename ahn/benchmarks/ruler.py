"""RULER-style synthetic tasks (NVIDIA RULER), generated locally at any length, RULER scoring.

Tasks and their settings are RULER's ``scripts/synthetic.yaml``; templates, answer
prefixes and generation lengths its ``scripts/data/synthetic/constants.py``; generators
follow ``niah.py``, ``variable_tracking.py``, ``common_words_extraction.py`` and
``freq_words_extraction.py``; scoring is ``string_match_all`` of
``scripts/eval/synthetic/constants.py`` after ``postprocess_pred`` (``scripts/eval/evaluate.py``).
The QA tasks (which need SQuAD / HotpotQA) are not included.

What differs from RULER, so that nothing is downloaded: the essay haystack is the text
shipped in ``data/ruler/haystack.txt`` (or any ``--data`` text file) instead of Paul
Graham's essays, split into sentences at ``.``/``!``/``?`` followed by whitespace instead of
NLTK's ``sent_tokenize``; key words come from the pool in ``data/ruler/words.txt`` instead
of the wonderwords lists, extended with syllable-made words when common-words extraction
needs more distinct words than the pool has. Each sample is sized with the evaluated
model's tokenizer: its full input (chat template and answer prefix included) plus the
task's generation length fits the requested length.
"""

from __future__ import annotations

import random
import re
import string
import sys
import uuid
from importlib import resources
from pathlib import Path
from typing import Callable

from ahn.benchmarks.evaluate import Dataset, Sample, _csv, build_input_ids, parse_token_counts

METRIC = "RULER score"
# Samples are generated to fit their length: no truncation.
DEFAULT_MAX_LENGTH = sys.maxsize
DECODE_HALVES = True
DEFAULT_SAMPLES = 25

# constants.py TASKS: template, answer prefix, tokens to generate.
TEMPLATES = {
    "niah": ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
             "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
             "{type_needle_v} for {query} mentioned in the provided text?",
             " The special magic {type_needle_v} for {query} mentioned in the provided text are", 128),
    "variable_tracking": ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                          "{context}\nQuestion: Find all variables that are assigned the value {query} in the text "
                          "above.",
                          " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
                          "variables are assigned the value {query}, they are: ", 30),
    "common_words_extraction": ("Below is a numbered list of words. In these words, some appear more often than "
                                "others. Memorize the ones that appear most often.\n{context}\nQuestion: What are "
                                "the 10 most common words in the above list?",
                                " Answer: The top 10 words that appear most often in the list are:", 120),
    "freq_words_extraction": ("Read the following coded text and track the frequency of each coded word. Find the "
                              "three most frequently appeared coded words. {context}\nQuestion: Do not provide any "
                              "explanation. Please ignore the dots '....'. What are the three most frequently "
                              "appeared words in the above coded text?",
                              " Answer: According to the coded text above, the three most frequently appeared "
                              "words are:", 50),
}
# niah.py needle and noise haystack (the noise haystack is also variable_tracking.py's).
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# niah.py DEPTHS: 40 insertion depths (percent) of the essay haystack.
DEPTHS = [round(100 * i / 39) for i in range(40)]

# synthetic.yaml (qa_1 / qa_2 omitted).
TASKS = {
    "niah_single_1": ("niah", dict(haystack="noise", k="words", v="numbers", num_k=1, num_v=1, num_q=1)),
    "niah_single_2": ("niah", dict(haystack="essay", k="words", v="numbers", num_k=1, num_v=1, num_q=1)),
    "niah_single_3": ("niah", dict(haystack="essay", k="words", v="uuids", num_k=1, num_v=1, num_q=1)),
    "niah_multikey_1": ("niah", dict(haystack="essay", k="words", v="numbers", num_k=4, num_v=1, num_q=1)),
    "niah_multikey_2": ("niah", dict(haystack="needle", k="words", v="numbers", num_k=1, num_v=1, num_q=1)),
    "niah_multikey_3": ("niah", dict(haystack="needle", k="uuids", v="uuids", num_k=1, num_v=1, num_q=1)),
    "niah_multivalue": ("niah", dict(haystack="essay", k="words", v="numbers", num_k=1, num_v=4, num_q=1)),
    "niah_multiquery": ("niah", dict(haystack="essay", k="words", v="numbers", num_k=1, num_v=1, num_q=4)),
    "vt": ("variable_tracking", dict(num_chains=1, num_hops=4)),
    "cwe": ("common_words_extraction", dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    "fwe": ("freq_words_extraction", dict(alpha=2.0)),
}
DEFAULT_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
# freq_words_extraction.py: coded word length; vocabulary size = length // 50.
CODED_WORDLEN = 6
VOCAB_DIVISOR = 50
# variable_tracking.py main(): the in-context example is the largest one within 500 tokens (at least 5 noise
# sentences, its bisection's lower bound).
VT_ICL_TOKENS = 500
VT_ICL_MIN_NOISES = 5


def _data_file(name: str) -> str:
    return resources.files("ahn.benchmarks").joinpath("data", "ruler", name).read_text(encoding="utf-8")


def word_pool() -> tuple[list[str], list[str]]:
    """(adjectives, nouns) of ``data/ruler/words.txt``."""
    lines = [ln for ln in _data_file("words.txt").splitlines() if ln and not ln.startswith("#")]
    parts = dict(ln.split(":", 1) for ln in lines)
    return parts["adjectives"].split(), parts["nouns"].split()


def sentences(text: str) -> list[str]:
    """Sentences split at ``.``, ``!`` or ``?`` followed by whitespace (whitespace runs collapsed)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]


def score(prediction: str, outputs: list[str]) -> float:
    """RULER's ``string_match_all`` for one sample: the fraction of ``outputs`` found (case-insensitive)
    in the prediction after ``postprocess_pred`` (strip; control characters become newlines)."""
    pred = re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip().lower()
    return sum(1.0 for r in outputs if r.lower() in pred) / len(outputs)


class Generator:
    """RULER task texts from a seeded ``random.Random``; ``haystack`` is the essay text."""

    def __init__(self, haystack: str):
        self.essay = haystack.split()
        if not self.essay:
            raise ValueError("the haystack text is empty; pass a text file with --data")
        adjs, nouns = word_pool()
        self.keys = sorted({f"{a}-{n}" for a in adjs for n in nouns})
        self.words = sorted(set(adjs + nouns))

    # -------------------------------------------------------------- needles
    def _value(self, rng: random.Random, kind: str) -> str:
        if kind == "numbers":
            return str(rng.randint(10**6, 10**7 - 1))
        if kind == "words":
            return rng.choice(self.keys)
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    def _essay_text(self, n: int) -> str:
        repeats = (n + len(self.essay) - 1) // len(self.essay)
        return " ".join((self.essay * repeats)[:n])

    def _insert_at_depths(self, rng: random.Random, n_words: int, inserts: list[str]) -> str:
        sents = sentences(self._essay_text(n_words))
        cuts = [0] + sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(inserts))) + [len(sents)]
        parts = []
        for i in range(1, len(cuts)):
            parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
            if i - 1 < len(inserts):
                parts.append(inserts[i - 1])
        return " ".join(parts)

    def niah(self, rng: random.Random, size: int, haystack: str, k: str, v: str, num_k: int, num_v: int,
             num_q: int) -> tuple[str, str, list[str]]:
        """(input, answer prefix, answers) of ``niah.py``'s ``generate_input_output``; ``size`` haystack units."""
        num_k = max(num_k, num_q)
        keys, values, needles = [], [], []
        for _ in range(num_k):
            keys.append(self._value(rng, k))
            values.append([self._value(rng, v) for _ in range(num_v)])
            needles += [NEEDLE.format(type_needle_v=v, key=keys[-1], value=x) for x in values[-1]]
        rng.shuffle(needles)
        if haystack == "essay":
            context = self._insert_at_depths(rng, size, needles)
        else:
            sents = ([NOISE] * size if haystack == "noise" else
                     [NEEDLE.format(type_needle_v=v, key=self._value(rng, k), value=self._value(rng, v))
                      for _ in range(size)])
            for index, needle in zip(sorted(rng.sample(range(size), len(needles)), reverse=True), needles):
                sents.insert(index, needle)
            context = "\n".join(sents)
        picked = rng.sample(range(num_k), num_q)
        queries = [keys[i] for i in picked]
        answers = [a for i in picked for a in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template, prefix, _ = TEMPLATES["niah"]
        type_v = v
        if num_q * num_v == 1:
            subs = (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer"))
            for a, b in subs:
                template, prefix = template.replace(a, b), prefix.replace(a, b)
            type_v = v[:-1]
        return (template.format(type_needle_v=type_v, context=context, query=query),
                prefix.format(type_needle_v=type_v, query=query), answers)

    # -------------------------------------------------------------- variable tracking
    def _vt(self, rng: random.Random, size: int, num_chains: int, num_hops: int, icl: bool):
        k = 3 if icl else 5
        names: list[str] = []
        while len(set(names)) < num_chains * (num_hops + 1):
            names.append("".join(rng.choices(string.ascii_uppercase, k=k)))
        names = list(dict.fromkeys(names))
        chains, chain_vars = [], []
        for c in range(num_chains):
            vs = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
            first = "12345" if icl else str(rng.randint(10000, 99998))
            chains.append([f"VAR {vs[0]} = {first}"] + [f"VAR {vs[j + 1]} = VAR {vs[j]} " for j in range(num_hops)])
            chain_vars.append(vs)
        sents = [NOISE] * size
        for chain in chains:
            positions = sorted(rng.sample(range(len(sents)), len(chain)))
            for j, pos in enumerate(positions):
                sents.insert(pos + j, chain[j])
        context = "\n".join(sents).replace(". \n", ".\n")
        value = chains[0][0].split("=")[-1].strip()
        template, prefix, _ = TEMPLATES["variable_tracking"]
        return (template.format(context=context, query=value), prefix.format(num_v=num_hops + 1, query=value),
                chain_vars[0])

    def vt_example(self, rng: random.Random, size: int, num_chains: int, num_hops: int) -> str:
        """The answered in-context example of ``variable_tracking.py`` (value 12345), ``size`` noise sentences."""
        text, prefix, names = self._vt(rng, size, num_chains, num_hops, icl=True)
        return text + prefix + " " + " ".join(names)

    def vt(self, rng: random.Random, size: int, num_chains: int, num_hops: int,
           icl_size: int) -> tuple[str, str, list[str]]:
        """``variable_tracking.py``: its in-context example (fresh value) before the task."""
        icl = self.vt_example(rng, icl_size, num_chains, num_hops).replace("12345", str(rng.randint(10000, 99998)))
        text, prefix, answers = self._vt(rng, size, num_chains, num_hops, icl=False)
        return icl + "\n" + text, prefix, answers

    # -------------------------------------------------------------- common / frequent words
    def _distinct_words(self, rng: random.Random, n: int) -> list[str]:
        if n <= len(self.words):
            return rng.sample(self.words, n)
        syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
        out = set(self.words)
        while len(out) < n:
            out.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))))
        return rng.sample(sorted(out), n)

    def _cwe_example(self, rng: random.Random, num_words: int, cr: int, ucr: int, num_cw: int):
        words = self._distinct_words(rng, num_words)
        common, uncommon = words[:num_cw], words[num_cw:]
        listing = common * cr + uncommon * ucr
        rng.shuffle(listing)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listing)), common

    def cwe(self, rng: random.Random, size: int, freq_cw: int, freq_ucw: int, num_cw: int,
            short: bool) -> tuple[str, str, list[str]]:
        """``common_words_extraction.py``: one answered example, then the list of ``size`` distinct words.

        ``short`` (target length < 4096) uses RULER's lighter repetition counts.
        """
        template, prefix, _ = TEMPLATES["common_words_extraction"]
        ex_args, main_args = ((20, 3, 1), (6, 1)) if short else ((40, 10, 3), (freq_cw, freq_ucw))
        ex_ctx, ex_ans = self._cwe_example(rng, *ex_args, num_cw)
        ctx, answers = self._cwe_example(rng, size, *main_args, num_cw)
        shot = template.format(context=ex_ctx) + prefix + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_ans))
        return shot + "\n" + template.format(context=ctx), prefix, answers

    def fwe(self, rng: random.Random, size: int, alpha: float, vocab_size: int) -> tuple[str, str, list[str]]:
        """``freq_words_extraction.py``: ``size`` coded words with Zipf(alpha) counts; answer = ranks 2-4."""
        vocab: set[str] = set()
        while len(vocab) < vocab_size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=CODED_WORDLEN)))
        ranked = sorted(vocab)
        rng.shuffle(ranked)
        ranked[0] = "..."  # the most frequent word is noise
        zeta = sum(k ** -alpha for k in range(1, 100000)) + 100000 ** (1 - alpha) / (alpha - 1)
        counts = [int(size * (k ** -alpha) / zeta) for k in range(1, len(ranked) + 1)]
        words = [w for w, c in zip(ranked, counts) for _ in range(c)]
        rng.shuffle(words)
        template, prefix, _ = TEMPLATES["freq_words_extraction"]
        return template.format(context=" ".join(words)), prefix, ranked[1:4]


def _fit(fits: Callable[[int], bool], lo: int) -> int:
    """Largest size >= ``lo`` with ``fits(size)``, by doubling then bisection (RULER bisects); ``lo``
    when even ``lo`` does not fit."""
    if not fits(lo):
        return lo
    hi = lo
    while fits(hi * 2):
        hi *= 2
    a, b = hi, hi * 2 - 1
    while a < b:
        mid = (a + b + 1) // 2
        a, b = (mid, b) if fits(mid) else (a, mid - 1)
    return a


def parse_lengths(value) -> list[int]:
    """``--lengths`` as token counts (default: 4k to 128k)."""
    return parse_token_counts(value) if value else list(DEFAULT_LENGTHS)


def load(args, tokenizer, use_chat: bool) -> list[Dataset]:
    """Generate ``--limit`` (default 25) samples per task (``--datasets``) and length (``--lengths``)."""
    names = _csv(args.datasets) if args.datasets else list(TASKS)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown RULER tasks {unknown}; tasks: {', '.join(TASKS)}")
    haystack = Path(args.data).read_text(encoding="utf-8") if args.data else _data_file("haystack.txt")
    gen = Generator(haystack)
    count = args.limit or DEFAULT_SAMPLES
    out = []
    for length in parse_lengths(args.lengths):
        for name in names:
            kind, cfg = TASKS[name]
            budget = length - TEMPLATES[kind][2]

            def n_tokens(text, prefix, kind=kind):
                probe = Sample(id="", prompt="", max_new_tokens=0, reference={}, answer_prefix=prefix)
                return len(build_input_ids(tokenizer, probe, text, use_chat))

            icl_size = 0
            if kind == "variable_tracking":
                probe = random.Random(f"{args.seed}/{name}/icl")
                icl_size = _fit(lambda s: len(tokenizer(gen.vt_example(probe, s, **cfg))["input_ids"]) <= VT_ICL_TOKENS,
                                VT_ICL_MIN_NOISES)

            def make(size, rng, kind=kind, cfg=cfg, length=length, icl_size=icl_size):
                if kind == "niah":
                    return gen.niah(rng, size, **cfg)
                if kind == "variable_tracking":
                    return gen.vt(rng, size, **cfg, icl_size=icl_size)
                if kind == "common_words_extraction":
                    return gen.cwe(rng, size, **cfg, short=length < 4096)
                return gen.fwe(rng, size, cfg["alpha"], max(4, length // VOCAB_DIVISOR))

            lo = {"niah": 4 if cfg.get("haystack") != "essay" else 32, "common_words_extraction": 12}.get(kind, 8)
            def probe_tokens(size, make=make, n_tokens=n_tokens, name=name, length=length):
                text, prefix, _ = make(size, random.Random(f"{args.seed}/{name}/{length}/probe"))
                return n_tokens(text, prefix)

            smallest = probe_tokens(lo) + TEMPLATES[kind][2]  # input + answer
            if smallest > length:
                raise ValueError(f"--lengths {length} is too short for {name}: its smallest sample (input and answer) "
                                 f"takes {smallest} tokens; ask for --lengths {smallest} or more")
            size = _fit(lambda s, probe_tokens=probe_tokens, budget=budget: probe_tokens(s) <= budget, lo)
            samples = []
            for i in range(count):
                rng_seed = f"{args.seed}/{name}/{length}/{i}"
                used = size
                text, prefix, answers = make(used, random.Random(rng_seed))
                while n_tokens(text, prefix) > budget and used > lo:  # RULER shrinks an unlucky sample
                    used = max(lo, used - max(1, size // 20))
                    text, prefix, answers = make(used, random.Random(rng_seed))
                samples.append(Sample(id=str(i), prompt=text, max_new_tokens=TEMPLATES[kind][2],
                                      reference={"outputs": answers}, answer_prefix=prefix))
            out.append(Dataset(f"{name}_{length}", samples, lambda pred, s: score(pred, s.reference["outputs"])))
    return out
