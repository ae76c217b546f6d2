"""Per-sample scorers of LV-Eval, InfiniteBench, LongBench and RULER on hand-made cases.

Expected values are worked out by hand from the official definitions (cited in the modules).
"""

from __future__ import annotations

import pytest

from ahn.benchmarks import infinitebench, longbench, lveval, ruler
from ahn.benchmarks.evaluate import middle_truncate
from ahn.benchmarks.metrics import normalize_answer, normalize_zh_answer, qa_f1, qa_f1_zh, rouge_l, rouge_lsum, rouge_zh

approx = pytest.approx


# ----------------------------------------------------------------------------- shared metrics
def test_normalisation():
    assert normalize_answer("The Cat, sat on  a mat!") == "cat sat on mat"
    assert normalize_zh_answer("北京， 天安门。Hi!") == "北京天安门hi"


def test_english_f1():
    assert qa_f1("the cat sat", "Cat sat on the mat") == approx(2 / 3)  # P = 2/2, R = 2/4
    assert qa_f1("dog", "cat") == 0.0
    assert qa_f1("", "cat") == 0.0


def test_chinese_f1_uses_jieba_words():
    # jieba: 北京天安门 -> 北京 / 天安门; one shared word of 1 vs 2
    assert qa_f1_zh("天安门", "北京天安门") == approx(2 / 3)
    assert qa_f1_zh("天安门！", "北京天安门") == approx(2 / 3)  # punctuation dropped


def test_rouge_l_of_rouge_1_0_1():
    assert rouge_l("a b c d", "a c d e") == approx(0.75, abs=1e-7)  # LCS a c d: P = R = 3/4
    assert rouge_l("a a a", "a") == approx(1.0, abs=1e-7)  # distinct words: m = n = 1
    assert rouge_l("a. c", "a c") == approx(1.0, abs=1e-7)  # sentences split at "."
    assert rouge_l("", "a b") == 0.0 and rouge_l("...", "a") == 0.0  # empty hypothesis -> 0
    assert rouge_zh("北京天安门", "北京天安门") == approx(1.0, abs=1e-7)


def test_rouge_lsum_of_rouge_score():
    # ref: the cat sat on the mat (6); candidate lines: "the cat sat" + "the dog" (5 tokens);
    # union LCS hits: the, cat, sat (the second line's LCS "the" maps to the same reference index)
    assert rouge_lsum("the cat sat\nthe dog", "the cat sat on the mat") == approx(6 / 11)
    assert rouge_lsum("The CAT, sat!", "the cat sat") == approx(1.0)
    assert rouge_lsum("", "the cat") == 0.0


def test_middle_truncation_keeps_start_and_end():
    assert middle_truncate(list(range(10)), 4) == [0, 1, 8, 9]
    assert middle_truncate(list(range(10)), 5) == [0, 1, 8, 9]  # floor(max/2) each side, as LongBench / LV-Eval
    assert middle_truncate([1, 2, 3], 4) == [1, 2, 3]
    with pytest.raises(ValueError, match="max_length"):
        middle_truncate([1, 2, 3], 1)


# ----------------------------------------------------------------------------- LV-Eval
def test_lveval_keyword_gating_english():
    rec = {"answers": ["the history of Rome"], "answer_keywords": "history of Rome"}
    assert lveval.score("loogle_SD_mixup_16k", "Rome", rec) == approx(0.5)  # recall 1/3 >= 0.2; F1: P 1, R 1/3
    # "of" is shared but is a stop word: keyword recall 0 -> 0, although the plain F1 would be 0.5
    assert lveval.score("loogle_SD_mixup_16k", "of", rec) == 0.0
    assert lveval.score("factrecall_en_16k", "of", rec) == approx(0.5)  # factrecall: plain F1, no gate
    no_kw = {"answers": ["the history of Rome"], "answer_keywords": ""}
    assert lveval.score("hotpotwikiqa_mixup", "of", no_kw) == approx(0.5)  # empty keywords: no gate


def test_lveval_keyword_gating_chinese_and_stop_words():
    rec = {"answers": ["北京天安门"], "answer_keywords": "天安门"}
    assert lveval.score("cmrc_mixup_32k", "天安门", rec) == approx(2 / 3)
    assert lveval.score("cmrc_mixup_32k", "北京", rec) == 0.0  # keyword recall 0 < 0.4
    # without keywords the answer is the keyword list: 北京 covers 1/2 >= 0.4
    assert lveval.score("lic_mixup", "北京", {"answers": ["北京天安门"]}) == approx(2 / 3)
    # 的 is a stop word: shared, but not counted as a recalled keyword
    stop = {"answers": ["北京的"], "answer_keywords": "北京的"}
    assert lveval.score("multifieldqa_zh_mixup", "的", stop) == 0.0
    assert lveval.score("factrecall_zh", "的", stop) == approx(2 / 3)


def test_lveval_dureader_rouge_with_blacklist():
    # 的 is blacklisted, so these are identical after filtering (plain ROUGE-L would be < 1)
    assert lveval.score("dureader_mixup_64k", "北京的天安门", {"answers": ["北京天安门"]}) == approx(1.0, abs=1e-7)
    assert rouge_zh("北京的天安门", "北京天安门") < 0.9


def test_lveval_scores_the_first_answer_only():
    rec = {"answers": ["Paris", "London"], "answer_keywords": None}
    assert lveval.score("hotpotwikiqa_mixup_256k", "London", rec) == 0.0
    assert lveval.score("hotpotwikiqa_mixup_256k", "Paris", rec) == 1.0


def test_lveval_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown LV-Eval dataset 'hotpotqa'"):
        lveval.score("hotpotqa", "x", {"answers": ["x"]})
    with pytest.raises(ValueError, match="'answers'"):
        lveval.score("cmrc_mixup", "x", {"answer": ["x"]})
    with pytest.raises(ValueError, match="'answer_keywords'"):
        lveval.score("cmrc_mixup", "x", {"answers": ["x"], "answer_keywords": ["x"]})
    with pytest.raises(TypeError, match="prediction"):
        lveval.score("cmrc_mixup", None, {"answers": ["x"]})


# ----------------------------------------------------------------------------- InfiniteBench
def ib(task, pred, answer, options=None):
    return infinitebench.score(task, pred, {"answer": answer, "options": options or []})


def test_infinitebench_retrieval_and_numbers():
    assert ib("passkey", "The pass key is 71432.", ["71432"]) == 1.0
    assert ib("passkey", "7143 2", ["71432"]) == 0.0  # first integer only
    assert ib("number_string", "3141592653", ["3141592653"]) == 1.0
    assert ib("kv_retrieval", 'The value is "c5a8-77".', ["c5a8-77"]) == 1.0
    assert ib("kv_retrieval", "c5a8-7", ["c5a8-77"]) == 0.0  # whole words only
    assert ib("code_run", "func_2(4) returns 14", [14]) == 1.0  # last word
    assert ib("code_run", "14 is not the last word", [14]) == 0.0
    assert ib("code_run", "the value is -3", [-3]) == 1.0
    assert ib("math_find", "87, I think", [87]) == 1.0
    assert ib("math_find", "8.5", [8.5]) == 1.0 and ib("math_find", "8.5", [8]) == 0.0
    assert ib("math_calc", "[1, 3, 4, 2]", [1, 3, 5, 2]) == approx(0.5)  # counts until the first miss


def test_infinitebench_option_letters():
    opts = ["func_1", "func_2", "func_3", "func_4"]
    assert ib("code_debug", "C. func_3", ["func_3"], opts) == 1.0
    assert ib("code_debug", "The correct option is: func_3", ["func_3"], opts) == 1.0
    assert ib("code_debug", "A. func_1", ["func_3"], opts) == 0.0
    book = ["Mara", "Tomas", "The storm", "A sailor"]
    assert ib("longbook_choice_eng", "B", ["Tomas"], book) == 1.0
    assert ib("longbook_choice_eng", "The answer is B", ["Tomas"], book) == 1.0
    assert ib("longbook_choice_eng", "Tomas", ["Tomas"], book) == 1.0  # the option text itself
    assert ib("longbook_choice_eng", "I pick: D", ["Tomas"], book) == 0.0
    assert ib("longbook_choice_eng", "", ["Tomas"], book) == 0.0


def test_infinitebench_text_tasks():
    assert ib("longdialogue_qa_eng", "I think it is Tomas.", ["TOMAS"]) == 1.0
    assert ib("longbook_qa_eng", "the flashes", ["lights", "the flashes"]) == 1.0  # best over answers
    assert ib("longbook_qa_chn", "北京", ["北京市"]) == approx(0.8)  # characters: P 1, R 2/3
    assert ib("longbook_sum_eng", "the cat sat\nthe dog", ["the cat sat on the mat"]) == approx(6 / 11)


def test_infinitebench_errors():
    with pytest.raises(ValueError, match="unknown InfiniteBench task"):
        ib("passkeys", "1", ["1"])
    with pytest.raises(ValueError, match="'answer'.*not one of the 'options'"):
        ib("longbook_choice_eng", "A", ["Nobody"], ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="'options'"):
        infinitebench.score("code_debug", "A", {"answer": ["f"]})
    with pytest.raises(ValueError, match="'answer' is missing"):
        infinitebench.score("passkey", "1", {"input": "x"})


# ----------------------------------------------------------------------------- LongBench and RULER
def test_longbench_scores():
    assert longbench.score("triviaqa", "1921\nThe museum opened...", {"answers": ["1921"]}) == 1.0  # first line
    assert longbench.score("narrativeqa", "Tomas", {"answers": ["her brother Tomas", "Tomas"]}) == 1.0
    assert longbench.score("hotpotqa", "museum", {"answers": ["the Harbor Museum"]}) == approx(2 / 3)
    assert longbench.score("qmsum", "a b c d", {"answers": ["a c d e"]}) == approx(0.75, abs=1e-7)
    assert longbench.score("dureader", "北京天安门", {"answers": ["北京天安门"]}) == approx(1.0, abs=1e-7)
    with pytest.raises(ValueError, match="unknown LongBench task"):
        longbench.score("gov_report", "x", {"answers": ["x"]})


def test_ruler_string_match_all():
    assert ruler.score("The numbers are 123 and 789.", ["123", "456"]) == 0.5
    assert ruler.score("ABC-def", ["abc-DEF"]) == 1.0  # case-insensitive
    assert ruler.score("12\x0034", ["12\n34"]) == 1.0  # control characters become newlines
