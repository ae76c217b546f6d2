"""Text metrics of the official long-context harnesses, reimplemented without their dependencies.

Each function reproduces one official scorer exactly (same normalisation, tokenisation and
edge cases); the docstrings name the source. Shared by :mod:`ahn.benchmarks.lveval`,
:mod:`ahn.benchmarks.infinitebench` and :mod:`ahn.benchmarks.longbench`.

- ``normalize_answer`` / ``normalize_zh_answer`` / ``token_f1`` / ``qa_f1`` / ``qa_f1_zh`` /
  ``rouge_zh``: THUDM/LongBench ``metrics.py`` (LV-Eval's ``metrics.py`` copies them).
- ``rouge_l``: the ``rouge`` package 1.0.1 (pltrdy/rouge, pinned in LV-Eval's
  ``requirements.txt``), ``Rouge().get_scores([pred], [gold], avg=True)["rouge-l"]["f"]``
  inside the harnesses' ``try: ... except: return 0.0``.
- ``rouge_lsum``: Google's ``rouge_score`` as called by Hugging Face ``evaluate.load("rouge")``
  (InfiniteBench ``src/compute_scores.py``, longbook_sum_eng), ``rougeLsum`` F-measure.
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from typing import Sequence

# normalize_zh_answer's Chinese punctuation (LongBench metrics.py, identical in LV-Eval and InfiniteBench).
ZH_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_EN_PUNCT = frozenset(string.punctuation)
_ALL_PUNCT = frozenset(string.punctuation + ZH_PUNCTUATION)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lower-case, drop ASCII punctuation, the articles a/an/the and extra whitespace (SQuAD style)."""
    s = "".join(ch for ch in s.lower() if ch not in _EN_PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def normalize_zh_answer(s: str) -> str:
    """Lower-case, drop ASCII and Chinese punctuation and all whitespace."""
    return "".join("".join(ch for ch in s.lower() if ch not in _ALL_PUNCT).split())


def token_f1(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    """Bag-of-tokens F1 (0 when nothing is shared, including when either side is empty)."""
    num_same = sum((Counter(prediction) & Counter(ground_truth)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction)
    recall = num_same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, ground_truth: str) -> float:
    """English QA F1 on whitespace tokens of the normalised strings (LongBench ``qa_f1_score``)."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def jieba_cut(text: str) -> list[str]:
    """jieba's default (precise mode, ``cut_all=False``) segmentation, as every official Chinese metric uses."""
    import jieba  # optional dependency: only the Chinese metrics use it (the rest of ahn.benchmarks runs without)

    jieba.setLogLevel(logging.WARNING)  # jieba logs its dictionary loading at INFO on first use
    return list(jieba.cut(text, cut_all=False))


def zh_tokens(text: str) -> list[str]:
    """jieba words, each normalised with :func:`normalize_zh_answer`, empty ones dropped."""
    return [t for t in (normalize_zh_answer(w) for w in jieba_cut(text)) if t]


def qa_f1_zh(prediction: str, ground_truth: str) -> float:
    """Chinese QA F1 over normalised jieba words (LongBench ``qa_f1_zh_score``)."""
    return token_f1(zh_tokens(prediction), zh_tokens(ground_truth))


# ----------------------------------------------------------------------------- ROUGE-L (rouge 1.0.1)
def _rouge_sentences(text: str) -> list[str]:
    """``Rouge.get_scores``' split: on ".", pieces of length > 0, whitespace runs collapsed."""
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def _lcs_words(x: list[str], y: list[str]) -> list[str]:
    """The LCS of ``x`` (reference words) and ``y`` that rouge 1.0.1's ``_recon_lcs`` backtracks to.

    Ties go to ``j - 1`` unless ``table[i-1][j] > table[i][j-1]``, as in the original; the
    recursion is unrolled (the original recurses once per step and so fails, and scores 0,
    once ``len(x) + len(y)`` exceeds Python's recursion limit; here it does not).
    """
    n, m = len(x), len(y)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        row, prev, xi = table[i], table[i - 1], x[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if xi == y[j - 1] else max(prev[j], row[j - 1])
    out = []
    i, j = n, m
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            out.append(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out[::-1]


def rouge_l(prediction: str, ground_truth: str) -> float:
    """ROUGE-L F of the ``rouge`` package 1.0.1 (summary level), 0.0 where the harnesses catch an error.

    Faithful to its quirks: sentences are split on "." only; words are split on single
    spaces; with its default ``exclusive=True`` the word counts ``m``, ``n`` and the union
    LCS are *sets* of distinct words; ``F = 2PR / (P + R + 1e-8)``. An empty hypothesis or
    reference (no non-empty piece between dots) raises in the package, and the harnesses
    return 0.0.
    """
    hyp, ref = _rouge_sentences(prediction), _rouge_sentences(ground_truth)
    if not hyp or not ref:
        return 0.0
    ref_words = [s.split(" ") for s in ref]
    hyp_words = [s.split(" ") for s in hyp]
    m = len({w for s in ref_words for w in s})
    n = len({w for s in hyp_words for w in s})
    union: set[str] = set()
    for r in ref_words:
        for h in hyp_words:
            union.update(_lcs_words(r, h))
    recall, precision = len(union) / m, len(union) / n
    return 2.0 * (precision * recall) / (precision + recall + 1e-8)


def rouge_zh(prediction: str, ground_truth: str) -> float:
    """:func:`rouge_l` on space-joined jieba words (LongBench ``rouge_zh_score``)."""
    return rouge_l(" ".join(jieba_cut(prediction)), " ".join(jieba_cut(ground_truth)))


# ----------------------------------------------------------------------------- ROUGE-Lsum (rouge_score)
_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_VALID_TOKEN = re.compile(r"^[a-z0-9]+$")


def _rouge_score_tokens(text: str) -> list[str]:
    """rouge_score's default tokenizer without stemmer: lower-case, non-[a-z0-9] runs become spaces."""
    return [t for t in re.split(r"\s+", _NON_ALNUM.sub(" ", text.lower())) if _VALID_TOKEN.match(t)]


def _lcs_indices(ref: list[str], can: list[str]) -> list[int]:
    """rouge_score's ``_backtrack_norec``: reference indices of one LCS (ties go to ``i - 1``)."""
    n, m = len(ref), len(can)
    t = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            t[i][j] = t[i - 1][j - 1] + 1 if ref[i - 1] == can[j - 1] else max(t[i - 1][j], t[i][j - 1])
    out = []
    i, j = n, m
    while i > 0 and j > 0:
        if ref[i - 1] == can[j - 1]:
            out.append(i - 1)
            i, j = i - 1, j - 1
        elif t[i][j - 1] > t[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return out[::-1]


def rouge_lsum(prediction: str, ground_truth: str) -> float:
    """ROUGE-Lsum F-measure of ``rouge_score`` (``use_stemmer=False``, the ``evaluate`` default).

    Sentences are the non-empty lines; for each reference sentence the union of its LCS
    with every predicted sentence counts as hits, each token at most as often as it occurs
    on both sides.
    """
    ref = [_rouge_score_tokens(s) for s in ground_truth.split("\n") if len(s)]
    can = [_rouge_score_tokens(s) for s in prediction.split("\n") if len(s)]
    m, n = sum(map(len, ref)), sum(map(len, can))
    if not ref or not can or not m or not n:
        return 0.0
    cnt_r = Counter(t for s in ref for t in s)
    cnt_c = Counter(t for s in can for t in s)
    hits = 0
    for r in ref:
        union = sorted(set().union(*(_lcs_indices(r, c) for c in can)))
        for t in (r[i] for i in union):
            if cnt_c[t] > 0 and cnt_r[t] > 0:
                hits += 1
                cnt_c[t] -= 1
                cnt_r[t] -= 1
    precision, recall = hits / n, hits / m
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
