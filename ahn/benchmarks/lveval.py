"""LV-Eval (infinigence/LVEval): 11 datasets x 5 length levels, keyword-recall-gated F1.

Prompts, generation lengths, metrics and stop-word lists are those of the official
repository (``config.py``, ``metrics.py``, ``prediction.py``, ``utils.py``,
``evaluation.py``). A record (one line of ``<dataset>_<level>.jsonl``) has ``input``,
``context``, ``answers`` (list) and, for most datasets, ``answer_keywords``; only the first
answer is scored, as ``evaluation.py`` does.

Data: ``--data DIR`` holding ``<dataset>_<level>.jsonl`` (the official local layout,
``load_LVEval_dataset``), or a Hub id (default layout: ``infini-ai/LVEval``, config
``<dataset>_<level>``, split ``test``).
"""

from __future__ import annotations

import re
from collections import Counter

from ahn.benchmarks.evaluate import Dataset, Sample, _csv, field_of, load_records
from ahn.benchmarks.metrics import (
    jieba_cut, normalize_answer, normalize_zh_answer, qa_f1, qa_f1_zh, rouge_l, token_f1, zh_tokens,
)

METRIC = "LV-Eval score"
# prediction.py --model-max-length default (prompt tokens kept by middle truncation).
DEFAULT_MAX_LENGTH = 15500
# utils.py truncate_prompt: decode(first half) + decode(last half).
DECODE_HALVES = True

# config.py DATASET_LENGTH_LEVEL
LENGTH_LEVELS = ("16k", "32k", "64k", "128k", "256k")

# config.py DATASET_MAXGEN
MAX_NEW_TOKENS = {
    "hotpotwikiqa_mixup": 64,
    "loogle_SD_mixup": 64,
    "loogle_CR_mixup": 64,
    "loogle_MIR_mixup": 64,
    "multifieldqa_en_mixup": 64,
    "multifieldqa_zh_mixup": 64,
    "factrecall_en": 16,
    "factrecall_zh": 16,
    "cmrc_mixup": 64,
    "lic_mixup": 64,
    "dureader_mixup": 64,
}
DATASETS = tuple(MAX_NEW_TOKENS)

_EN_MIXUP = (
    "Please answer the following question based on the given passages. Questions and answers are only relevant to "
    "one passage. Only give me the answer and do not output any other explanation and evidence.\n\nArticle: {context}"
    "\n\nPlease answer the following question based on the above passages. Questions and answers are only relevant "
    "to one passage. Only give me the answer and do not output any other explanation and evidence.\n\n"
    "Question: {input}\nAnswer:"
)
_ZH_MIXUP = ("请根据下面给定的文章回答问题，问题和答案只与其中一篇文章有关。\n\n文章：{context}\n\n"
             "现在请基于上述文章回答下面的问题，问题和答案只与其中一篇文章有关。\n\n问题：{input}\n回答：")
# config.py DATASET_PROMPT
PROMPTS = {
    "hotpotwikiqa_mixup": (
        "Answer the question based on the given passages. Questions and answers are only relevant to some passages. "
        "Only give me the answer and do not output any other explanation and evidence.\n\nArticle: {context}\n\n"
        "Please answer the following question based on the above passages. Questions and answers are only relevant "
        "to some passages. Only give me the answer and do not output any other explanation and evidence.\n\n"
        "Question: {input}\nAnswer:"
    ),
    "loogle_SD_mixup": _EN_MIXUP,
    "loogle_CR_mixup": _EN_MIXUP,
    "loogle_MIR_mixup": _EN_MIXUP,
    "multifieldqa_en_mixup": _EN_MIXUP,
    "multifieldqa_zh_mixup": ("请阅读以下文章并用中文回答问题，问题和答案只与其中一篇文章有关。只需要直接给出问题的答案，不要输出其他任何解释和证据。"
                              "\n\n文章：{context}\n\n请基于上面的文章回答下面的问题，问题和答案只与其中一篇文章有关。"
                              "只需要直接给出问题的答案，不要输出其他任何解释和证据。\n\n问题：{input}\n回答："),
    "factrecall_en": ("Please answer the following questions based on the given article.\n\nArticle: {context}\n\n"
                      "Please answer the following questions based on the above article.\n\nQuestion: {input}\nAnswer:"),
    "factrecall_zh": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n现在请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "cmrc_mixup": _ZH_MIXUP,
    "lic_mixup": ("请根据下面给定的文章回答问题，问题和答案只与其中一篇文章有关。\n\n文章：{context}\n\n"
                  "请现在基于上述文章回答下面的问题，问题和答案只与其中一篇文章有关。\n\n问题：{input}\n回答："),
    "dureader_mixup": _ZH_MIXUP,
}

# metrics.py ABANDON_WORDS_EN: keywords that do not count towards the keyword recall.
ABANDON_WORDS_EN = frozenset([
    "and", "to", "of", "in", "her", "was", "with", "for", "it", "from", "is", "that", "his", "he", "by", "she",
    "they", "or", "at", "because", "be", "on", "are", "their", "what", "as", "had", "were", "about", "being",
    "this", "who", "but", "have", "has", "when", "which", "does",
])
# metrics.py ABANDON_WORDS_ZH: stop words (keyword recall of the Chinese QA sets; dureader's ROUGE blacklist).
ABANDON_WORDS_ZH = frozenset([
    "的", "和", "是", "等", "在", "年", "可以", "为", "与", "‰", "了", "或", "一种", "月", "c", "至", "日", "有", "进行",
    "于", "不", "中", "×", "根据", "小", "由", "亩", "也", "要", "指", "法", "会", "元", "主要", "以及", "通过", "首先",
    "对", "然后", "号", "以", "所", "后", "丁", "包括", "无", "将", "用", "能", "形", "方面", "因素", "位于", "而", "从",
    "到", "一定", "用于", "但", "使用", "让", "具有", "并", "亿元", "万元", "上", "类", "基于", "才", "来", "地", "片",
    "其他", "个", "或者", "变得", "时", "给", "你", "使", "条", "受", "已经", "带", "度",
])
# metrics.py qa_f1_score_with_gold_ans / qa_f1_zh_score_with_gold_ans: the score is 0 below this keyword recall.
KEYWORD_RECALL_EN = 0.2
KEYWORD_RECALL_ZH = 0.4


def qa_f1_with_keywords(prediction: str, ground_truth: str, keywords) -> float:
    """English F1 gated by keyword recall (``qa_f1_score_with_gold_ans``).

    When ``keywords`` is non-empty: recall = (shared tokens of prediction and keywords,
    stop words excluded, counted with multiplicity) / (keyword tokens, stop words included);
    below 0.2 the score is 0 (also when the keywords normalise to nothing, where the
    original divides by zero).
    """
    pred = normalize_answer(prediction).split()
    if keywords:
        kw = normalize_answer(keywords).split()
        common = Counter(pred) & Counter(kw)
        recall = sum(v for k, v in common.items() if k not in ABANDON_WORDS_EN) / len(kw) if kw else 0.0
        if recall < KEYWORD_RECALL_EN:
            return 0.0
    return token_f1(pred, normalize_answer(ground_truth).split())


def qa_f1_zh_with_keywords(prediction: str, ground_truth: str, keywords) -> float:
    """Chinese F1 over jieba words gated by keyword recall >= 0.4 (``qa_f1_zh_score_with_gold_ans``).

    Without keywords the answer itself serves as the keywords, as in the original (which
    divides by zero when they segment to nothing; here the score is then 0).
    """
    pred, gold = zh_tokens(prediction), zh_tokens(ground_truth)
    kw = zh_tokens(keywords or ground_truth)
    common = Counter(pred) & Counter(kw)
    recall = sum(v for k, v in common.items() if k not in ABANDON_WORDS_ZH) / len(kw) if kw else 0.0
    if recall < KEYWORD_RECALL_ZH:
        return 0.0
    return token_f1(pred, gold)


def rouge_zh_blacklist(prediction: str, ground_truth: str) -> float:
    """dureader_mixup's ROUGE-L (``rouge_zh_score_blacklist``).

    The original joins jieba words with spaces, segments that string again, normalises each
    piece, drops the Chinese stop words (the empty pieces left by the spaces stay, and
    vanish in rouge's whitespace split) and scores ROUGE-L of rouge 1.0.1.
    """
    def words(text: str) -> str:
        pieces = (normalize_zh_answer(t) for t in jieba_cut(" ".join(jieba_cut(text))))
        return " ".join(t for t in pieces if t not in ABANDON_WORDS_ZH)

    return rouge_l(words(prediction), words(ground_truth))


# config.py DATASET_METRIC
SCORERS = {
    "hotpotwikiqa_mixup": qa_f1_with_keywords,
    "loogle_SD_mixup": qa_f1_with_keywords,
    "loogle_CR_mixup": qa_f1_with_keywords,
    "loogle_MIR_mixup": qa_f1_with_keywords,
    "multifieldqa_en_mixup": qa_f1_with_keywords,
    "multifieldqa_zh_mixup": qa_f1_zh_with_keywords,
    "factrecall_en": lambda p, g, k: qa_f1(p, g),
    "factrecall_zh": lambda p, g, k: qa_f1_zh(p, g),
    "cmrc_mixup": qa_f1_zh_with_keywords,
    "lic_mixup": qa_f1_zh_with_keywords,
    "dureader_mixup": lambda p, g, k: rouge_zh_blacklist(p, g),
}


def _keywords(record: dict, where: str):
    keywords = record.get("answer_keywords")
    if keywords is not None and not isinstance(keywords, str):
        raise ValueError(f"{where}: field 'answer_keywords' must be a string, got {keywords!r:.80}")
    return keywords


def dataset_name(dataset: str) -> str:
    """``hotpotwikiqa_mixup_128k`` -> ``hotpotwikiqa_mixup`` (``evaluation.py``'s ``re.split('_.{1,3}k', ...)``)."""
    name = re.split("_.{1,3}k", dataset)[0]
    if name not in SCORERS:
        raise ValueError(f"unknown LV-Eval dataset {dataset!r}; datasets: {', '.join(DATASETS)} "
                         f"(optionally with a length suffix such as _16k)")
    return name


def score(dataset: str, prediction: str, record: dict) -> float:
    """Official per-sample LV-Eval score in [0, 1] of ``prediction`` against ``record["answers"][0]``.

    ``dataset`` may carry the length suffix (``hotpotwikiqa_mixup_128k``); ``record`` is an
    LV-Eval record (``answers``; ``answer_keywords`` where the dataset has them).
    """
    name = dataset_name(dataset)
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}")
    answers = field_of(record, "answers", "list[str]", f"LV-Eval {dataset} record")
    return float(SCORERS[name](prediction, answers[0], _keywords(record, f"LV-Eval {dataset} record")))


def load(args, tokenizer, use_chat: bool) -> list[Dataset]:
    """The requested datasets x length levels as :class:`Dataset` lists (``--datasets``, ``--lengths``, ``--limit``)."""
    names = _csv(args.datasets) if args.datasets else list(DATASETS)
    levels = _csv(args.lengths) if args.lengths else list(LENGTH_LEVELS)
    for n in names:
        dataset_name(n)
        if n not in DATASETS:
            raise ValueError(f"--datasets {n!r}: give dataset names without a length suffix ({', '.join(DATASETS)})")
    bad = [lv for lv in levels if lv not in LENGTH_LEVELS]
    if bad:
        raise ValueError(f"--lengths {bad}: LV-Eval length levels are {', '.join(LENGTH_LEVELS)}")
    full_names = [f"{n}_{lv}" for n in names for lv in levels]
    data = load_records(args.data, full_names, lambda full: (full, "test"), args.limit,
                        "a directory of <dataset>_<level>.jsonl files or a Hub id such as infini-ai/LVEval")
    out = []
    for full, rows in data.items():
        n = dataset_name(full)
        samples = []
        for i, (loc, record) in enumerate(rows):
            field_of(record, "input", "str", loc)
            field_of(record, "context", "str", loc)
            answers = field_of(record, "answers", "list[str]", loc)
            keywords = _keywords(record, loc)
            prompt = PROMPTS[n].format(input=record["input"], context=record["context"])
            samples.append(Sample(id=str(i), prompt=prompt, max_new_tokens=MAX_NEW_TOKENS[n],
                                  reference={"answers": answers, "answer_keywords": keywords}))
        out.append(Dataset(full, samples, lambda pred, s, full=full: score(full, pred, s.reference)))
    return out
