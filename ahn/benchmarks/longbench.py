"""LongBench (THUDM/LongBench, v1): the six tasks of the AHN paper.

Prompts: ``config/dataset2prompt.json``; generation lengths: ``config/dataset2maxlen.json``;
metrics: ``metrics.py`` / ``eval.py`` (best score over all answers; for triviaqa only the
first line of the prediction is scored). ``pred.py`` wraps prompts in the chat format
except for few-shot tasks (here: triviaqa), and middle-truncates to the model's maximum
length (``config/model2maxlen.json``: 31500 tokens for the 32k-context models).

A record (one line of ``<task>.jsonl`` or a row of the Hub dataset ``THUDM/LongBench``,
config ``<task>``, split ``test``) has ``input``, ``context`` and ``answers`` (a list).
"""

from __future__ import annotations

from ahn.benchmarks.evaluate import Dataset, Sample, _csv, field_of, load_records
from ahn.benchmarks.metrics import qa_f1, rouge_l, rouge_zh

METRIC = "LongBench score"
# config/model2maxlen.json: 31500 for the 32k-context models (chatglm2-6b-32k, longchat-v1.5-7b-32k).
DEFAULT_MAX_LENGTH = 31500
# pred.py: decode(first half) + decode(last half).
DECODE_HALVES = True

_MQA = ("Answer the question based on the given passages. Only give me the answer and do not output any other "
        "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
        "Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:")
# config/dataset2prompt.json
PROMPTS = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
        "{context}\n\nNow, answer the question based on the story as concisely as you can, using a single phrase if "
        "possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"
    ),
    "hotpotqa": _MQA,
    "musique": _MQA,
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one "
        "or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript "
        "in one or more sentences.\n\nQuery: {input}\nAnswer:"
    ),
    "triviaqa": ("Answer the question based on the given passage. Only give me the answer and do not output any "
                 "other words. The following are some examples.\n\n{context}\n\n{input}"),
}
# config/dataset2maxlen.json
MAX_NEW_TOKENS = {"narrativeqa": 128, "hotpotqa": 32, "musique": 32, "dureader": 128, "qmsum": 512, "triviaqa": 32}
TASKS = tuple(PROMPTS)
# eval.py dataset2metric
SCORERS = {"narrativeqa": qa_f1, "hotpotqa": qa_f1, "musique": qa_f1, "dureader": rouge_zh, "qmsum": rouge_l,
           "triviaqa": qa_f1}
# pred.py: "chat models are better off without build prompts on these tasks"; eval.py: first line only.
NO_CHAT = frozenset({"triviaqa"})
FIRST_LINE = frozenset({"triviaqa"})


def _check_task(task: str) -> None:
    if task not in SCORERS:
        raise ValueError(f"unknown LongBench task {task!r}; tasks: {', '.join(TASKS)}")


def score(task: str, prediction: str, record: dict) -> float:
    """Official per-sample LongBench score in [0, 1]: the best over ``record["answers"]``."""
    _check_task(task)
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}")
    answers = field_of(record, "answers", "list[str]", f"LongBench {task} record")
    if task in FIRST_LINE:
        prediction = prediction.lstrip("\n").split("\n")[0]
    return float(max(SCORERS[task](prediction, a) for a in answers))


def load(args, tokenizer, use_chat: bool) -> list[Dataset]:
    """The requested tasks (``--datasets``, ``--limit``) from ``--data`` (directory of <task>.jsonl or Hub id)."""
    tasks = _csv(args.datasets) if args.datasets else list(TASKS)
    for t in tasks:
        _check_task(t)
    data = load_records(args.data, tasks, lambda t: (t, "test"), args.limit,
                        "a directory of <task>.jsonl files or the Hub id THUDM/LongBench")
    out = []
    for t, rows in data.items():
        samples = []
        for i, (loc, record) in enumerate(rows):
            prompt = PROMPTS[t].format(input=field_of(record, "input", "str", loc),
                                       context=field_of(record, "context", "str", loc))
            answers = field_of(record, "answers", "list[str]", loc)
            samples.append(Sample(id=str(i), prompt=prompt, max_new_tokens=MAX_NEW_TOKENS[t],
                                  reference={"answers": answers}, chat=t not in NO_CHAT))
        out.append(Dataset(t, samples, lambda pred, s, t=t: score(t, pred, s.reference)))
    return out
