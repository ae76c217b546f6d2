"""InfiniteBench (OpenBMB/InfiniteBench): 12 tasks beyond 100k tokens with per-task scoring.

Templates and generation lengths: ``src/prompt.py`` and ``src/eval_utils.py``; scoring:
``src/compute_scores.py``. With a chat template the prompts are the chat-model templates
(``gpt4_templates``) sent as a user turn after the system message "You are a helpful
assistant" (``create_msgs``); without one, the completion templates of the open-model
harnesses (``yarn_mistral_templates``, also used for Yi-200k and ChatGLM3). Prompts are
middle-truncated to 128k tokens (``TRUNCATE_LEN`` of ``eval_yarn_mistral.py``).

A record (one line of ``<task>.jsonl``, or one row of the Hub dataset
``xinrongzhang2022/InfiniteBench``, split ``<task>``) has ``context``, ``input``, ``answer``
(a list) and, for ``longbook_choice_eng`` / ``code_debug``, ``options``.

Where the official code cannot run on the released records, the fix the maintained forks
use is applied, and said so in the function concerned: the question is read from ``input``
(the released records have no ``question`` / ``func`` fields), ``code_debug`` is formatted
with its options, and labels that are lists or numeric strings are unwrapped / converted
before comparison (the official comparison of a list or a string with a word or an int
is always false). GPT-4-only details (``math_calc``'s few-shot chat and dropping the first
predicted number) are not applied.
"""

from __future__ import annotations

import re

from ahn.benchmarks.evaluate import Dataset, Sample, _csv, field_of, load_records
from ahn.benchmarks.metrics import normalize_zh_answer, qa_f1, rouge_lsum, token_f1

METRIC = "InfiniteBench score"
# eval_yarn_mistral.py TRUNCATE_LEN (128 * 1024).
DEFAULT_MAX_LENGTH = 128 * 1024
# eval_yarn_mistral.py truncate_by_tokens: decode(ids[:half] + ids[-half:]) once.
DECODE_HALVES = False

# eval_utils.py DATA_NAME_TO_MAX_NEW_TOKENS
MAX_NEW_TOKENS = {
    "passkey": 6,
    "number_string": 12,
    "kv_retrieval": 50,
    "longbook_sum_eng": 1200,
    "longbook_choice_eng": 40,
    "longbook_qa_eng": 40,
    "longbook_qa_chn": 40,
    "longdialogue_qa_eng": 40,
    "math_find": 3,
    "math_calc": 30000,
    "code_run": 5,
    "code_debug": 5,
}
TASKS = tuple(MAX_NEW_TOKENS)
# eval_utils.py create_msgs: the system message of chat models.
SYSTEM = "You are a helpful assistant"

_MASK_Q = ('Below is a dialogue script where one random occurrence of a character name is replaced with "$$MASK$$", '
           "and you should try to guess who that character is.")
# prompt.py gpt4_templates (chat models).
CHAT_TEMPLATES = {
    "passkey": ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                "I will quiz you about the important information there.\n\n{context}\n\n{input}"),
    "number_string": ("There is an important info hidden inside a lot of irrelevant text. Find it. "
                      "I will quiz you about the important information there.\n\n{context}\n\n{input}"),
    "kv_retrieval": "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}\n\n{input}",
    "longbook_qa_eng": "Read the book below and answer a question.\n\n{context}\n\nQuestion: {question}\n\nBe very concise.",
    "longbook_choice_eng": (
        "Read the book and answer the question.\n\n{context}\n\nQuestion: {question}\n\nOnly one of the following "
        "options is correct, tell me the answer using one single letter (A, B, C, or D). Don't say anything else.\n"
        "A. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}"
    ),
    "longbook_sum_eng": "Summarize the following book.\n\n{context}",
    "longbook_qa_chn": "请根据以下书籍回答我的问题。\n\n{context}\n\n问题：{question}\n请尽量简短地回答。",
    "math_find": "{prefix}\n\n{context}\n\n{input}",
    "math_calc": "Compute the intermediate values in the following long expression.\n\n{context}",
    "code_run": ("Following is a set of Python functions. There is a function called named {func}.\n\n{context}\n\n"
                 "Please give me the exact number of the return value of {func_call}. Be concise. Your response must "
                 "end with the final returned value."),
    "code_debug": (
        "There is ONLY ONE function in the large project that is deliberately made to include an obvious error. "
        "Please find the function that contains the most obvious errors. I will give you four options to narrow your "
        "scope. You can inspect the options and think. Eventually, tell me the answer using one single letter "
        "(A, B, C, or D).\n\n{context}\n\nWhich funtion has deliberate error?\nA. {OPTION_A}\nB. {OPTION_B}\n"
        "C. {OPTION_C}\nD. {OPTION_D}\n\nYou should first find the functions in the options. Repeat their content, "
        "inspect through code, and at last give me your answer for the function that has the deliberate and obvious "
        "error in A, B, C, or D."
    ),
    "longdialogue_qa_eng": (
        _MASK_Q + "\n\nThe dialogue:\n\n---\n\n{context}\n\n---\n\nEnd of dialogue.\n\nWhich character is most likely "
        '"$$MASK$$"? Just say the name used by the scriptwriter (before the colon marks) of one single character and '
        "nothing else."
    ),
}
# prompt.py yarn_mistral_templates (completion models).
COMPLETION_TEMPLATES = {
    "passkey": ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                "I will quiz you about the important information.\n\n{context}\n\n{input}\n\nThe pass key is"),
    "number_string": ("There is an important info hidden inside a lot of irrelevant text. Find it. I will quiz you "
                      "about the important information there.\n\n{context}\n\n{input}\n\nThe sequence of digits is"),
    "kv_retrieval": "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}\n\n{input}",
    "longbook_sum_eng": "Summarize the book below.\n\n{context}\n\nSummary:",
    "longbook_choice_eng": ("Read the book and answer the question.\n\n{context}\n\nQuestion: {question}\n"
                            "A. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}\n\n"
                            "The letter of the correct answer is"),
    "longbook_qa_eng": ("Read the book and answer the question. Be very concise in your answer.\n\n{context}\n\n"
                        "Question: {question}\nAnswer:"),
    "longbook_qa_chn": "阅读以下书籍然后回答问题。\n\n{context}\n\n问题：{question}\n答案：",
    "math_find": "{prefix}\n\n{context}\n\n{input}",
    "math_calc": ("Let us calculate the intermediate values of an expression.\n\nExpression: 1 + 3 + 4\n"
                  "Values: [1, 4, 8]\n\nExpression: 8 - 3 + 2 - 4\nValues: [8, 5, 7, 3]\n\nExpression: {context}\n"
                  "Values:"),
    "code_run": ("There is a function called {func} in the following Python code.\n\n{context}\n\n"
                 "Please compute the exact value of {func_call}. The value of {func_call} is"),
    "code_debug": ("Following is a Python code where exactly one of the functions/methods has a deliberate error "
                   "that makes it crash.\n\n{context}\n\nOptions:\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\n"
                   "D. {OPTION_D}\n\nThe correct option is:"),
    "longdialogue_qa_eng": _MASK_Q + "\n\n{context}\n\nThe name that has been replaced with $$MASK$$ is likely",
}
OPTION_LETTERS = "ABCD"
_FUNC_CALL = re.compile(r"func_[0-9]+\(\-?[0-9]+\)")  # eval_utils.py create_prompt, code_run
_TARGET_NUMBER = re.compile(r"The .+ of")  # eval_utils.py create_prompt, math_find


def _check_task(task: str) -> None:
    if task not in MAX_NEW_TOKENS:
        raise ValueError(f"unknown InfiniteBench task {task!r}; tasks: {', '.join(TASKS)}")


def label_of(task: str, record: dict, where: str = "InfiniteBench record"):
    """``get_answer`` of ``eval_utils.py``: ``answer``, and for choice tasks [option text, letter]."""
    answer = record.get("answer")
    if answer is None:
        raise ValueError(f"{where}: field 'answer' is missing (fields present: {sorted(record)})")
    if task not in ("longbook_choice_eng", "code_debug"):
        if not isinstance(answer, (list, str, int, float)) or (isinstance(answer, list) and not answer):
            raise ValueError(f"{where}: field 'answer' must be a non-empty list (or a value), got {answer!r:.80}")
        return answer
    options = field_of(record, "options", "list", where)
    if len(options) != 4:
        raise ValueError(f"{where}: field 'options' must hold 4 options (A-D), got {len(options)}")
    if isinstance(answer, list) and len(answer) == 2 and answer[1] in OPTION_LETTERS:
        return answer
    text = answer[0] if isinstance(answer, list) and len(answer) == 1 else answer
    if text not in options:
        raise ValueError(f"{where}: field 'answer' {answer!r:.80} is not one of the 'options' {options!r:.200}")
    return [text, OPTION_LETTERS[options.index(text)]]


def _first(label):
    return label[0] if isinstance(label, list) else label


def first_int_match(prediction: str) -> str:
    """The first run of digits in ``prediction`` ("" if none)."""
    return next((p for p in re.split("[^0-9]", prediction) if p != ""), "")


def _blank(pred: str, chars) -> str:
    """``pred`` with each of ``chars`` (characters or strings) replaced by a space."""
    for c in chars:
        pred = pred.replace(c, " ")
    return pred


def _words(pred: str, chars) -> list[str]:
    return _blank(pred, chars).split()


def score_kv_retrieval(pred: str, label) -> bool:
    """The value is one of the words after splitting on newlines and ``:"'.,?!{}`` (label list unwrapped)."""
    return str(_first(label)) in _words(pred, "\n:\"'.,?!{}")


def score_passkey(pred: str, label) -> bool:
    """The first integer in the prediction equals the answer (also number_string)."""
    return str(_first(label)) == first_int_match(pred)


def score_code_run(pred: str, label) -> bool:
    """The last word (after splitting on newlines and ``.`'":``) is the integer answer."""
    words = _words(pred.strip(), "\n.`'\":")
    if not words:
        return False
    try:
        return int(_first(label)) == int(words[-1])
    except ValueError:
        return False


def _collapse_spaces(pred: str) -> str:
    while "  " in pred:
        pred = pred.replace("  ", " ")
    return pred


def score_code_debug(pred: str, label) -> bool:
    """Option letter followed by "." / ":", or letter / function name after an answer prefix."""
    fn_name, letter = label[0], label[1]
    pred = pred.strip()
    if pred[:2] in (f"{letter}.", f"{letter}:"):
        return True
    pred = _collapse_spaces(_blank(pred, ["\n", "`", "'", '"', "-", "*", "Option", "option"]))
    for prefix in ("answer is:", "is:", "answer:", "correct option is:"):
        idx = pred.find(prefix)
        if idx == -1:
            continue
        if len(pred) < idx + len(prefix) + 1:
            return False
        rest = pred[idx + len(prefix) + 1:]
        return rest.startswith(letter) or rest.startswith(fn_name)
    return False


def score_math_find(pred: str, label) -> bool:
    """The first number (``\\d+\\.\\d+|\\d+``) equals the answer, compared as int or float like the label.

    A decimal where the label is an int scores 0 (the original's ``int("3.5")`` raises).
    """
    label = _first(label)
    if isinstance(label, str):
        try:
            label = int(label)
        except ValueError:
            label = float(label)
    found = re.search(r"\d+\.\d+|\d+", pred)
    if found is None:
        return False
    if isinstance(label, int):
        return int(found.group(0)) == label if "." not in found.group(0) else False
    return float(found.group(0)) == label


def score_longdialogue(pred: str, label) -> bool:
    """The (upper-case) name is one of the upper-cased words of the prediction."""
    return _first(label) in [w.upper() for w in _words(pred.strip(), "\n:\"'.,?!{}")]


def score_choice(pred: str, label) -> bool:
    """First letter, the whole answer, an answer prefix, or the first A-D word (``longbook_choice_eng``)."""
    pred = pred.strip()
    if pred == "":
        return False
    if pred[0] in OPTION_LETTERS:
        return pred[0] in label
    if pred in label:
        return True
    pred = _collapse_spaces(_blank(pred, "\n\"'.,?!{}"))
    for prefix in ("answer is:", "answer:", "answer is", "option is"):
        idx = pred.find(prefix)
        if idx == -1:
            continue
        if len(pred) < idx + len(prefix) + 1:
            return False
        after = pred[idx + len(prefix) + 1:]
        return any(after.startswith(s) for s in label)
    for word in pred.split():
        if word in OPTION_LETTERS:
            return word in label
    return False


def score_qa_eng(pred: str, label) -> float:
    """Best English QA F1 over the answers."""
    return max(qa_f1(pred, g) for g in (label if isinstance(label, list) else [label]))


def score_qa_chn(pred: str, label) -> float:
    """Best character-level F1 of the normalised strings over the answers (``qa_f1_score_zh``)."""
    return max(token_f1(list(normalize_zh_answer(pred)), list(normalize_zh_answer(g)))
               for g in (label if isinstance(label, list) else [label]))


def score_sum(pred: str, label) -> float:
    """Best ROUGE-Lsum F over the reference summaries (``evaluate`` rouge, ``rougeLsum``)."""
    return max(rouge_lsum(pred, g) for g in (label if isinstance(label, list) else [label]))


def score_math_calc(pred: str, label) -> float:
    """Fraction of the expected values matched in order by the integers of the prediction, up to the first miss."""
    if isinstance(label[0], list):
        label = label[0]
    nums = [int(p) for p in re.split("[^0-9]", pred) if p != ""]
    cnt = 0
    for i, value in enumerate(label):
        if i >= len(nums) or int(value) != nums[i]:
            break
        cnt += 1
    return cnt / len(label)


# compute_scores.py NAME_TO_SCORE_GETTER
SCORERS = {
    "kv_retrieval": score_kv_retrieval,
    "passkey": score_passkey,
    "number_string": score_passkey,
    "code_run": score_code_run,
    "code_debug": score_code_debug,
    "longdialogue_qa_eng": score_longdialogue,
    "longbook_qa_eng": score_qa_eng,
    "longbook_sum_eng": score_sum,
    "longbook_choice_eng": score_choice,
    "longbook_qa_chn": score_qa_chn,
    "math_find": score_math_find,
    "math_calc": score_math_calc,
}


def score(task: str, prediction: str, record: dict) -> float:
    """Official per-sample InfiniteBench score in [0, 1] of ``prediction`` for ``record`` (``answer``, ``options``)."""
    _check_task(task)
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}")
    return float(SCORERS[task](prediction, label_of(task, record, f"InfiniteBench {task} record")))


def build_prompt(task: str, record: dict, chat: bool, where: str) -> str:
    """The task's template filled from ``record`` (``create_prompt`` of ``eval_utils.py``)."""
    template = (CHAT_TEMPLATES if chat else COMPLETION_TEMPLATES)[task]
    context = field_of(record, "context", "str", where)
    question = field_of(record, "input", "str", where)
    if task == "code_run":
        calls = _FUNC_CALL.findall(question)
        if not calls:
            raise ValueError(f"{where}: field 'input' has no function call func_<n>(<int>): {question!r:.120}")
        return template.format(func=calls[0].split("(")[0], func_call=calls[0], context=context)
    if task in ("code_debug", "longbook_choice_eng"):
        options = field_of(record, "options", "list", where)
        if len(options) != 4:
            raise ValueError(f"{where}: field 'options' must hold 4 options (A-D), got {len(options)}")
        letters = {f"OPTION_{c}": o for c, o in zip(OPTION_LETTERS, options)}
        return template.format(context=context, question=question, **letters)
    if task == "math_find":
        target = _TARGET_NUMBER.findall(question)
        if not target:
            raise ValueError(f"{where}: field 'input' does not name the target number ('The ... of'): {question!r:.120}")
        prefix = f"What is {target[0].lower()[:-3]} in the following list?"
        return template.format(prefix=prefix, context=context, input=question)
    return template.format(context=context, input=question, question=question)


def load(args, tokenizer, use_chat: bool) -> list[Dataset]:
    """The requested tasks (``--datasets``, ``--limit``) from ``--data`` (directory of <task>.jsonl or Hub id)."""
    tasks = _csv(args.datasets) if args.datasets else list(TASKS)
    for t in tasks:
        _check_task(t)
    data = load_records(args.data, tasks, lambda t: (None, t), args.limit,
                        "a directory of <task>.jsonl files or a Hub id such as xinrongzhang2022/InfiniteBench")
    out = []
    for t, rows in data.items():
        samples = []
        for i, (loc, record) in enumerate(rows):
            label = label_of(t, record, loc)
            samples.append(Sample(id=str(i), prompt=build_prompt(t, record, use_chat, loc),
                                  max_new_tokens=MAX_NEW_TOKENS[t], reference={"label": label},
                                  system=SYSTEM if use_chat else None))
        out.append(Dataset(t, samples, lambda pred, s, t=t: float(SCORERS[t](pred, s.reference["label"]))))
    return out
