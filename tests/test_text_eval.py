"""`ahn demo --task text`: its scoring (greedy matches, needle regions, perplexity by position, repeats, equal
cache bytes) and the whole pipeline end to end on a tiny random model and the shipped sample text."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_model, tiny_qwen2_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ahn import AHNConfig, add_memory
from ahn.adapters import WEIGHTS_NAME
from ahn.demo.evaluate import answer_correct
from ahn.demo.teacher import DEMO_SINKS, DEMO_TASK, DEMO_WINDOW, load_teacher
from ahn.demo.text.corpus import sample_text
from ahn.demo.text.evaluate import (
    answer_token_shares, equal_bytes_slots, needle_region, plot_needle_grid, position_edges, position_nll, repeat_mask,
    span_matches,
)
from ahn.demo.text.run import MODE_NAMES, RESULTS_NAME, TextSettings, quick_settings, run_text_demo
from ahn.demo.text.tokenizer import train_tokenizer
from ahn.distill.synthetic import sample_recall


# ------------------------------------------------------------------ scoring on a model that can copy
@pytest.fixture(scope="module")
def recall_teacher():
    model = add_memory(load_teacher(), AHNConfig(window=DEMO_WINDOW, sinks=DEMO_SINKS))
    return model, sample_recall(DEMO_TASK, 12, torch.Generator().manual_seed(20261))


def test_span_matches_find_far_needles_with_full_attention_only(recall_teacher):
    """On the shipped recall teacher (it copies values from anywhere in its 256 tokens), the greedy-match scoring
    agrees answer for answer with the recall demo's own, and full attention finds the needles beyond the window
    that sinks + window cannot."""
    model, batch = recall_teacher
    seqs = batch["input_ids"].tolist()
    spans = [[(a, a + 1) for a in row] for row in batch["answer_positions"].tolist()]
    regions = [needle_region(a - 1, [s], DEMO_WINDOW, DEMO_SINKS) for row_a, row_s in
               zip(batch["answer_positions"].tolist(), batch["source_positions"].tolist()) for a, s in zip(row_a, row_s)]
    found = {}
    for mode in ("full", "window"):
        flags = span_matches(model, mode, seqs, spans, batch_size=5)
        assert torch.equal(torch.tensor(flags), answer_correct(model, batch, mode))
        found[mode] = [f for row in flags for f in row]
    beyond = [i for i, r in enumerate(regions) if r == "beyond"]
    within = [i for i, r in enumerate(regions) if r == "within"]
    assert len(beyond) > 30 and len(within) > 3
    acc = {m: sum(found[m][i] for i in beyond) / len(beyond) for m in found}
    assert acc["full"] >= 0.9 and acc["window"] <= 0.3
    assert sum(found["window"][i] for i in within) / len(within) >= 0.8


def test_answer_token_shares_give_partial_credit_per_token(recall_teacher):
    """A two-token span whose first token the model predicts and whose second it cannot (replaced by a token other
    than the model's argmax there: what precedes each prediction is unchanged) scores exactly 1/2, and no greedy
    match; a span the model gets whole scores 1."""
    model, batch = recall_teacher
    seq = batch["input_ids"][0].tolist()
    a = batch["answer_positions"][0, 0].item()
    assert span_matches(model, "full", [seq], [[(a, a + 1)]]) == [[True]]
    with torch.no_grad(), model.attention_mode("full"):
        after = model(input_ids=torch.tensor([seq[:a + 1]])).logits[0, -1].argmax().item()  # predicts position a + 1
    seq[a + 1] = (after + 1) % model.config.vocab_size
    assert answer_token_shares(model, "full", [seq], [[(a, a + 1), (a, a + 2)]]) == [[1.0, 0.5]]
    assert span_matches(model, "full", [seq], [[(a, a + 2)]]) == [[False]]


def test_needle_regions_and_bad_input(recall_teacher):
    assert needle_region(300, [20, 21], window=256, sinks=16) == "beyond"  # 300 - 21 >= 256, no sink
    assert needle_region(300, [45, 46], window=256, sinks=16) == "within"  # 300 - 45 < 256
    assert needle_region(300, [44, 45], window=256, sinks=16) == "straddle"
    assert needle_region(300, [3], window=256, sinks=16) == "within"  # a sink
    with pytest.raises(ValueError, match="positions is empty"):
        needle_region(10, [], 4, 0)
    with pytest.raises(ValueError, match=r"needle positions \[12\]"):
        needle_region(10, [12], 4, 0)
    model, _ = recall_teacher
    with pytest.raises(ValueError, match=r"answer spans \[\(0, 1\)\]"):
        span_matches(model, "full", [[5, 6, 7]], [[(0, 1)]])
    with pytest.raises(ValueError, match="2 sequences but 1 span lists"):
        span_matches(model, "full", [[5, 6], [7, 8]], [[(1, 2)]])
    with pytest.raises(ValueError, match="mode='sparse'"):
        span_matches(model, "sparse", [[5, 6]], [[(1, 2)]])
    with pytest.raises(TypeError, match="ahn.AHNModel"):
        span_matches(load_teacher(), "full", [[5, 6]], [[(1, 2)]])


# ------------------------------------------------------------------ perplexity by position, repeats
def test_position_buckets_and_repeats_beyond_the_window():
    assert position_edges(1024, 256, 16) == [0, 272, 528, 784, 1023]
    assert position_edges(200, 256, 16) == [0, 199]
    ids = list(range(100, 140))  # no repeats yet
    ids[30:34] = ids[5:9]  # a 4-token span first seen at 5..8, repeated at 30..33
    mask = repeat_mask(ids, span=4, window=8, sinks=2)
    assert mask.shape == (39,) and mask.nonzero().flatten().tolist() == [32]  # query 32 predicts token 33
    assert not repeat_mask(ids, span=4, window=30, sinks=2).any()  # still inside a longer window
    assert not repeat_mask(ids, span=4, window=8, sinks=6).any()  # its first token is a sink
    with pytest.raises(ValueError, match="span=0"):
        repeat_mask(ids, 0, 8, 2)


def test_first_window_perplexity_is_the_same_in_every_mode_and_differs_beyond():
    torch.manual_seed(0)
    model = add_memory(tiny_model(), AHNConfig(window=16, sinks=4))
    seqs = torch.randint(0, 97, (2, 60), generator=torch.Generator().manual_seed(1)).tolist()
    full, window = position_nll(model, "full", seqs), position_nll(model, "window", seqs)
    assert full.shape == (2, 59) and full.dtype == torch.float64
    assert torch.allclose(full[:, :20], window[:, :20], atol=1e-5)  # p < sinks + window sees its whole prefix
    assert (full[:, 20:] - window[:, 20:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="one length"):
        position_nll(model, "full", [[1, 2, 3], [1, 2]])


# ------------------------------------------------------------------ equal cache bytes
def test_buffer_alone_gets_the_bytes_of_the_memory_state():
    base = tiny_model()  # 2 layers, 4 query heads over 2 kv heads of 12 channels, float32
    config = AHNConfig(window=16, sinks=4, buffer_slots=4, salience_writes=True, readout="defer")
    eq = equal_bytes_slots(base, config)
    layers, kv, q, d = 2, 2, 4, 12
    per_slot = layers * kv * (2 * d * 4 + 8 + 4)  # k and v float32, the slot's int64 index, its float32 score
    assert eq["bytes_per_slot"] == per_slot
    state = layers * q * d * d * 4  # one float32 D x D state per query head
    assert eq["slots"] >= config.buffer_slots + state // per_slot
    assert eq["buffer_bytes"] <= eq["reference_bytes"] < eq["buffer_bytes"] + per_slot
    assert not hasattr(base, "ahn_config") and base.model.layers[0].self_attn.__class__.__name__ == "Qwen2Attention"


def test_needle_grid_png(tmp_path):
    path = tmp_path / "needles.png"
    plot_needle_grid(path, {"full": [[1.0, 0.5], [None, 0.0]], "window": [[0.0, 0.0], [1.0, 1.0]]}, [0, 100],
                     [512, 1024], "needles")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ the pipeline, miniature
@pytest.fixture(scope="module")
def tiny_text_teacher(tmp_path_factory):
    """A tiny random Qwen2 with a BPE trained on the first half of the shipped sample text, saved with it."""
    text = sample_text()
    half = text.index(". ", len(text) // 2) + 2
    texts = {"train": [text[:half]], "heldout": [text[half:]]}
    tok = train_tokenizer(texts["train"], vocab_size=500)  # 9 one-token words held out: recall of 2 and 4 pairs
    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(tiny_qwen2_config(vocab_size=len(tok), max_position_embeddings=256, initializer_range=0.3,
                                                               bos_token_id=tok.bos_token_id))
    d = tmp_path_factory.mktemp("text-teacher")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d, texts


def test_the_evaluation_and_the_distillation_data_draw_from_the_teachers_word_pool(tiny_text_teacher):
    from transformers import AutoTokenizer

    from ahn.demo.text import tasks
    from ahn.demo.text.run import held_out_sets, training_records

    teacher, texts = tiny_text_teacher
    tok = AutoTokenizer.from_pretrained(teacher)
    every = tasks.single_token_words(tok, texts["heldout"])
    pool = tasks.single_token_words(tok, texts["train"])[:8]
    assert not set(every) <= set(pool)
    settings = quick_settings(length=192, recall_pairs=(2,))
    sets = held_out_sets(tok, texts["heldout"], settings, 192, pool)
    asked = {a for ex in sets["recall"][2] for a in ex.answers}
    assert asked and asked <= set(pool)
    records = training_records(tok, texts["train"], quick_settings(length=192, train_sequences=30), 192, pool)
    pool_ids = {tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in pool}
    answers = {t for r in records for t, label in zip(r["input_ids"], r["labels"]) if label != tasks.IGNORE_INDEX}
    recall_answers = answers - {i for d in "0123456789 ,." for i in tok(d, add_special_tokens=False)["input_ids"]}
    assert recall_answers and recall_answers <= pool_ids


def test_text_demo_end_to_end_in_miniature(tiny_text_teacher, tmp_path):
    teacher, texts = tiny_text_teacher
    settings = quick_settings(length=192)
    lines = []
    results = run_text_demo(tmp_path / "run", settings, teacher_dir=teacher, texts=texts, progress=False,
                            print_fn=lines.append)
    saved = json.loads((tmp_path / "run" / RESULTS_NAME).read_text())
    assert saved == json.loads(json.dumps(results))
    assert tuple(saved["modes"]) == MODE_NAMES
    for mode, r in saved["modes"].items():
        for key in ("needle_beyond", "needle_within", "needle_tokens_beyond", "needle_tokens_within"):
            assert r[key] is None or 0 <= r[key] <= 1, (mode, key)
        for region in ("beyond", "within"):  # a whole needle found has all its tokens right
            assert (r[f"needle_{region}"] is None) == (r[f"needle_tokens_{region}"] is None)
            assert r[f"needle_{region}"] is None or r[f"needle_tokens_{region}"] >= r[f"needle_{region}"]
        assert r["ppl_beyond"] > 1 and r["ppl_first_window"] > 1
        assert sorted(r["recall"]) == ["2", "4"] and all(0 <= v <= 1 for v in r["recall"].values())
        assert len(r["needle_grid"]) == 2 and len(r["needle_grid"][0]) == len(saved["needle_lengths"])
        assert sorted(r["recall_beyond"]) == ["2", "4"] and "single" in r["needle_kinds"]
    m = saved["modes"]
    for mode in MODE_NAMES:  # the first window sees its whole prefix in every mode: no memory can change it
        assert abs(m[mode]["ppl_first_window"] / m["window"]["ppl_first_window"] - 1) < 1e-4, mode
    assert abs(m["full"]["ppl_beyond"] / m["window"]["ppl_beyond"] - 1) > 1e-3
    # The buffer alone: the slots that the memory's bytes buy, and a read-out held at zero through training.
    assert saved["mode_configs"]["buffer_only"]["buffer_slots"] == saved["equal_bytes"]["slots"] > settings.buffer_slots
    weights = load_file(str(tmp_path / "run" / "adapter-buffer_only" / WEIGHTS_NAME))
    o_proj = [w for name, w in weights.items() if name.endswith("o_proj.weight")]
    assert o_proj and all((w == 0).all() for w in o_proj)
    trained = load_file(str(tmp_path / "run" / "adapter-recommended" / WEIGHTS_NAME))
    assert any((w != 0).any() for name, w in trained.items() if name.endswith("o_proj.weight"))
    assert [t["target"] for t in saved["targets"]][0].startswith("needles beyond")
    table = (tmp_path / "run" / "results.md").read_text()
    assert "| recommended |" in table and ("pass" in table or "miss" in table)
    for png in ("needles.png", "perplexity.png", "recall.png"):
        assert (tmp_path / "run" / png).read_bytes()[:4] == b"\x89PNG"
    # A rerun reuses every adapter and every mode's scores; other training settings are refused.
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("scores-*.json")}
    again = run_text_demo(tmp_path / "run", settings, teacher_dir=teacher, texts=texts, progress=False,
                          print_fn=lines.append)
    assert again["modes"] == results["modes"] and again["train_seconds"] == results["train_seconds"]
    assert all(t["seconds"] > 0 and t["resumed"] is False for t in results["train_seconds"].values())
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("scores-*.json")} == before
    with pytest.raises(ValueError, match="other settings.*max_steps: 2 -> 3"):
        run_text_demo(tmp_path / "run", quick_settings(length=192, steps=3), teacher_dir=teacher, texts=texts,
                      progress=False, print_fn=lines.append)
    with pytest.raises(ValueError, match="other settings.*data: "):  # the same steps on other data
        run_text_demo(tmp_path / "run", quick_settings(length=192, train_sequences=9), teacher_dir=teacher, texts=texts,
                      progress=False, print_fn=lines.append)


def test_baselines_alone_distil_nothing(tiny_text_teacher, tmp_path, capsys):
    """--modes full,window scores the teacher's two baselines without training a memory; unknown modes are named."""
    from ahn.cli import main

    teacher, _ = tiny_text_teacher
    assert main(["demo", "--task", "text", "--quick", "--teacher", str(teacher), "--modes", "window,full", "--out",
                 str(tmp_path / "b"), "--no-progress", "--threads", "1"]) == 0
    saved = json.loads((tmp_path / "b" / RESULTS_NAME).read_text())
    assert list(saved["modes"]) == ["full", "window"] and not list((tmp_path / "b").glob("adapter-*"))
    assert all(t["pass"] is None for t in saved["targets"][:3])  # no recommended mode: nothing to check
    with pytest.raises(SystemExit) as e:
        main(["demo", "--task", "text", "--quick", "--teacher", str(teacher), "--modes", "full,sparse", "--out",
              str(tmp_path / "c")])
    assert e.value.code == 2 and "modes ['sparse']: choose one or more of full, window" in capsys.readouterr().err


def test_text_demo_flags_are_checked(tmp_path, capsys):
    from ahn.cli import main

    for argv, message in ((["--task", "text", "--pairs", "8"], "--pairs belongs to the recall task"),
                          (["--quick"], "--quick belongs to the text task"),
                          # a --no-X is a flag given, not one to drop silently
                          (["--task", "text", "--no-salience-writes"], "--salience-writes belongs to the recall task"),
                          (["--task", "text", "--memory", "all"], "--memory all is the recall task's")):
        with pytest.raises(SystemExit) as e:
            main(["demo", *argv, "--out", str(tmp_path / "x")])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:  # a teacher folder without weights: the fix is named, nothing is written
        main(["demo", "--task", "text", "--teacher", str(tmp_path / "empty"), "--out", str(tmp_path / "y")])
    assert e.value.code == 2 and "python -m ahn.demo.text.teacher --out" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
    with pytest.raises(ValueError, match="needle_depths"):
        TextSettings(needle_depths=(50, 120))


def test_demo_task_text_wiring(tmp_path, monkeypatch):
    """`ahn demo --task text --quick` runs the text demo with the quick settings on the shipped sample text, on the
    demo's thread count; `--task recall` (the default) still runs the recall demo."""
    import ahn.demo.run as demo_run
    import ahn.demo.text.run as text_run
    from ahn.cli import main

    seen = {}
    monkeypatch.setattr(text_run, "run_text_demo", lambda **kw: seen.update(kw, threads=torch.get_num_threads()))
    monkeypatch.setattr(demo_run, "run_demo", lambda **kw: seen.update(recall=True))
    assert main(["demo", "--task", "text", "--quick", "--steps", "3", "--teacher", str(tmp_path), "--out",
                 str(tmp_path / "q"), "--no-progress"]) == 0
    assert seen["settings"] == quick_settings(steps=3) and seen["teacher_dir"] == tmp_path
    assert main(["demo", "--task", "text", "--quick", "--no-salience-mass", "--teacher", str(tmp_path), "--out",
                 str(tmp_path / "q"), "--no-progress"]) == 0
    assert seen["settings"] == quick_settings(salience_mass=False)
    configs = text_run.mode_configs(seen["settings"], 40)
    assert [configs[m]["salience_mass"] for m in ("recommended", "buffer_only", "memory_only")] == [False] * 3
    assert "".join(seen["texts"]["train"] + seen["texts"]["heldout"]) == sample_text()
    assert seen["threads"] == demo_run.DEMO_THREADS and seen["progress"] is False
    assert main(["demo", "--out", str(tmp_path / "r")]) == 0 and seen.get("recall")


def test_retrain_teacher_calls_the_text_trainer(tmp_path, monkeypatch):
    """--retrain-teacher trains the text teacher into OUT/teacher from the run's seed (on the quick run's sample text)
    before anything else loads it."""
    import ahn.demo.text.run as text_run
    from ahn.cli import main

    calls = []

    def trainer(out_dir, **kw):
        calls.append((out_dir, kw))
        raise ValueError("stop here")

    monkeypatch.setattr(text_run, "train_text_teacher", trainer)
    with pytest.raises(SystemExit):
        main(["demo", "--task", "text", "--quick", "--retrain-teacher", "--teacher-steps", "7", "--seed", "3",
              "--out", str(tmp_path / "r"), "--no-progress"])
    (out_dir, kw), = calls
    assert out_dir == tmp_path / "r" / "teacher" and kw["steps"] == 7 and kw["seed"] == 3
    assert "".join(kw["train_texts"] + kw["heldout_texts"]) == sample_text()
