"""The demo's parts: the synthetic recall generator, the teacher recipe, the shipped teacher, the evaluation."""

from __future__ import annotations

import json

import pytest
import torch

import ahn
from ahn import AHNConfig, add_memory
from ahn.demo.evaluate import distance_edges, evaluate_modes, plot_accuracy
from ahn.demo.teacher import (
    DEMO_SINKS, DEMO_TASK, DEMO_WINDOW, TRAINING_RECORD, WEIGHTS_DIR, TeacherRecipe, curriculum_task, load_teacher,
    previous_token_drill, train_teacher,
)
from ahn.distill.synthetic import (
    BOS, IGNORE_INDEX, QUERY, RecallTask, passkey_task, recall_records, sample_recall,
)

SMALL = RecallTask(seq_len=80, num_pairs=6, num_keys=10, num_values=7, num_filler=5)
HELD_OUT_SEED = 20261  # never used for training (train_teacher draws from seed + 1 = 1)


def draw(task=SMALL, batch=16, seed=0):
    return sample_recall(task, batch, torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ generator
def test_same_seed_same_data_other_seed_other_data():
    a, b, c = draw(seed=3), draw(seed=3), draw(seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], c["input_ids"])


@pytest.mark.parametrize("task", [SMALL, passkey_task(seq_len=40, value_len=3, num_keys=4)], ids=["recall", "passkey"])
def test_layout_ranges_and_answers_by_construction(task):
    batch = draw(task)
    ids, ans, src = batch["input_ids"], batch["answer_positions"], batch["source_positions"]
    B, T = ids.shape
    A = task.queries * task.value_len
    assert ids.shape == (B, task.seq_len) and ans.shape == src.shape == batch["distance"].shape == (B, A)
    assert (ids[:, 0] == BOS).all() and (ids[:, task.query_start] == QUERY).all()
    is_key = (ids >= task.first_key) & (ids < task.first_value)
    is_value = (ids >= task.first_value) & (ids < task.vocab_size)
    is_filler = (ids >= 2) & (ids < task.first_key)
    assert (is_key ^ is_value ^ is_filler ^ (ids < 2)).all()  # every id in exactly one range
    context = slice(task.prefix_len, task.query_start)
    assert is_filler[:, 1:task.prefix_len].all()  # the sinks never hold a pair
    assert (is_key[:, context].sum(1) == task.num_pairs).all()
    assert (is_value[:, context].sum(1) == task.num_pairs * task.value_len).all()
    for b in range(B):
        keys = ids[b, context][is_key[b, context]]
        assert len(set(keys.tolist())) == task.num_pairs  # distinct keys
    rows = torch.arange(B).view(B, 1)
    assert (src >= task.prefix_len).all() and (src < task.query_start).all() and (ans > task.query_start).all()
    assert torch.equal(ids[rows, ans], ids[rows, src])  # the answer is the value in the context ...
    key_of = lambda pos: ids[rows, pos - 1 - (torch.arange(A) % task.value_len)]  # noqa: E731
    assert is_key[rows, ans - 1 - (torch.arange(A) % task.value_len)].all()
    assert torch.equal(key_of(ans), key_of(src))  # ... of the queried key
    assert torch.equal(batch["distance"], ans - 1 - src)


def test_labels_mark_exactly_the_answers():
    batch = draw()
    labels, mask, ids = batch["labels"], batch["answer_mask"], batch["input_ids"]
    assert torch.equal(mask, labels != IGNORE_INDEX)
    assert torch.equal(labels[mask], ids[mask])
    assert torch.equal(mask.nonzero()[:, 1].view(ids.shape[0], -1), batch["answer_positions"])


def test_records_are_the_rows_of_a_batch():
    records = recall_records(SMALL, 5, seed=7)
    batch = draw(batch=5, seed=7)
    assert len(records) == 5 and set(records[0]) == set(batch)
    assert torch.equal(torch.stack([r["input_ids"] for r in records]), batch["input_ids"])
    assert records[2]["labels"].shape == (SMALL.seq_len,)


def test_task_errors_name_the_fix():
    with pytest.raises(ValueError, match="raise seq_len to at least"):
        RecallTask(seq_len=30, num_pairs=8)
    with pytest.raises(ValueError, match="num_keys"):
        RecallTask(num_pairs=20, num_keys=10)
    with pytest.raises(ValueError, match="num_queries"):
        RecallTask(num_pairs=4, num_queries=5)
    with pytest.raises(TypeError, match="torch.Generator"):
        sample_recall(SMALL, 2, 0)


# ------------------------------------------------------------------ teacher recipe
def test_drill_labels_need_the_previous_token():
    d = previous_token_drill(3, 20, 50, torch.Generator().manual_seed(0))
    ids, labels = d["input_ids"], d["labels"]
    assert ids.shape == labels.shape == (3, 18)
    assert torch.equal(labels[:, 2::3], ids[:, 0::3]) and (labels[:, 0::3] == IGNORE_INDEX).all()


def test_curriculum_grows_to_the_task():
    r = TeacherRecipe()
    lengths = [curriculum_task(DEMO_TASK, r, s).seq_len for s in (0, r.hold_steps - 1, r.hold_steps,
                                                                     (r.hold_steps + r.grow_until) // 2, r.grow_until)]
    assert lengths[0] == lengths[1] == r.short_len and lengths[-1] == DEMO_TASK.seq_len
    assert lengths == sorted(lengths) and lengths[3] % 8 == 0


def test_teacher_recipe_runs_and_learns(tmp_path):
    task = RecallTask(seq_len=48, num_pairs=4, num_keys=8, num_values=8, num_filler=8)
    recipe = TeacherRecipe(hidden_size=32, intermediate_size=64, steps=60, batch_size=16, lr=1e-2, warmup=5,
                           short_len=32, hold_steps=20, grow_until=40)
    record = train_teacher(tmp_path, seed=0, task=task, recipe=recipe, progress=False)
    losses = record["losses"]
    assert len(losses) == 60
    recall = losses[41:]  # after the drill: recall steps only
    assert sum(recall[-5:]) / 5 < 0.8 * sum(losses[1:6:2]) / 3  # well below the untrained recall loss
    assert json.loads((tmp_path / TRAINING_RECORD).read_text())["recipe"]["steps"] == 60
    reloaded = load_teacher(tmp_path)
    assert reloaded.config.vocab_size == task.vocab_size


# ------------------------------------------------------------------ shipped teacher and evaluation
@pytest.fixture(scope="module")
def shipped():
    teacher = load_teacher()
    model = add_memory(teacher, AHNConfig(memory="gated_deltanet", window=DEMO_WINDOW, sinks=DEMO_SINKS))
    batch = sample_recall(DEMO_TASK, 48, torch.Generator().manual_seed(HELD_OUT_SEED))
    return model, batch, evaluate_modes(model, batch, DEMO_WINDOW)


def test_shipped_teacher_needs_the_far_context(shipped):
    _, _, results = shipped
    assert (WEIGHTS_DIR / "model.safetensors").stat().st_size < 2_000_000
    assert results["counts"]["beyond"] > 200 and results["counts"]["within"] > 10
    assert results["full"] >= 0.9
    assert results["window"] <= results["full"] - 0.3
    assert results["detail"]["window"]["within"] >= 0.8  # what the window sees, it still answers


def test_fresh_memory_is_exactly_the_window(shipped):
    _, _, results = shipped
    assert results["detail"]["ahn"] == results["detail"]["window"]  # zero-initialised output projection
    assert results["gap_closed"] == 0.0


def test_buckets_partition_the_answers(shipped):
    _, batch, results = shipped
    edges = distance_edges(DEMO_TASK.seq_len, DEMO_WINDOW)
    assert edges[0] == 0 and edges[1] == DEMO_WINDOW and edges[-1] == DEMO_TASK.seq_len
    buckets = results["detail"]["full"]["by_distance"]
    assert sum(b["count"] for b in buckets) == batch["distance"].numel()
    json.dumps(results)  # serialisable as results.json


def test_plot_and_input_errors(shipped, tmp_path):
    model, batch, results = shipped
    path = tmp_path / "accuracy.png"
    plot_accuracy(results, path, "recall")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="modes"):
        evaluate_modes(model, batch, DEMO_WINDOW, modes=["sparse"])
    with pytest.raises(ValueError, match="edges"):
        evaluate_modes(model, batch, DEMO_WINDOW, modes=["full"], edges=[5, 5])


# ------------------------------------------------------------------ the whole demo, miniature
def test_demo_pipeline_end_to_end_in_miniature(tmp_path):
    from ahn.demo.run import PLOT_NAME, RESULTS_NAME, SALIENCE_PLOT_NAME, DemoSettings, run_demo

    lines = []
    tiny = DemoSettings(steps=2, batch_size=4, train_examples=8, eval_examples=4)
    results = run_demo("all", out=tmp_path / "all", settings=tiny, progress=False, print_fn=lines.append)
    saved = json.loads((tmp_path / "all" / RESULTS_NAME).read_text())
    assert saved == json.loads(json.dumps(results))
    for key in ("full", "window", "ahn"):
        assert 0.0 <= saved[key] <= 1.0
    assert saved["full"] >= 0.9  # the shipped teacher, on the held-out sequences
    assert sorted(saved["memories"]) == sorted(ahn.available_memories())
    assert saved["ahn"] == saved["memories"]["gated_deltanet"]["beyond"]  # the default rule
    assert saved["attention"] == {"window": 32, "sinks": 4}
    assert (tmp_path / "all" / PLOT_NAME).stat().st_size > 0
    table = "\n".join(lines)
    for row in ("full attention", "sinks + window", "window + gated_deltanet", "window + mamba2"):
        assert row in table
    for mem in saved["memories"]:
        assert (tmp_path / "all" / f"adapter-{mem}" / "ahn_adapter.safetensors").exists()
    # The recommended configuration's analysis: what the buffer holds at the query, salience by kind, drift.
    analysis = saved["memories"]["gated_deltanet"]["analysis"]
    held = analysis["buffer_at_query"]["1"]
    assert abs(sum(held["entries"].values()) - 1) < 1e-6 and held["filled"] == 1.0
    assert 0 <= held["asked_values_held"] <= 1
    assert set(analysis["salience_by_kind"]["1"]) == {"key", "value", "filler", "other"}
    assert len(analysis["drift"]["ahn"]) == len(analysis["drift"]["window"]) == 2
    assert (tmp_path / "all" / SALIENCE_PLOT_NAME).stat().st_size > 0
    assert "buffer at the query" in table


def test_demo_retrains_the_teacher_and_rejects_bad_memory(tmp_path, capsys):
    from ahn.cli import main

    with pytest.warns(FutureWarning, match="--readout paper is renamed --readout add"):  # the old name still works
        rc = main(["demo", "--retrain-teacher", "--teacher-steps", "2", "--steps", "1", "--out", str(tmp_path / "d"),
                   "--no-progress", "--buffer", "0", "--no-salience-writes", "--readout", "paper"])  # the paper's mechanism
    assert rc == 0
    assert (tmp_path / "d" / "teacher" / "model.safetensors").exists()
    saved = json.loads((tmp_path / "d" / "results.json").read_text())
    assert saved["settings"]["steps"] == 1
    assert (saved["settings"]["buffer_slots"], saved["settings"]["salience_writes"], saved["settings"]["readout"]) == (
        0, False, "add")
    assert saved["memories"]["gated_deltanet"]["analysis"]["buffer_at_query"] == {}
    assert not (tmp_path / "d" / "salience.png").exists()
    with pytest.raises(SystemExit) as e:
        main(["demo", "--memory", "lstm", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "memory='lstm' is unknown" in capsys.readouterr().err


def test_no_progress_silences_library_bars_and_restores_them():
    """--no-progress also covers transformers' weight-loading and datasets' map / filter bars, only inside."""
    from datasets.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    from ahn._progress import library_progress

    before = (are_progress_bars_disabled(), hf_logging.is_progress_bar_enabled())
    with library_progress(False):
        assert are_progress_bars_disabled() and not hf_logging.is_progress_bar_enabled()
    assert (are_progress_bars_disabled(), hf_logging.is_progress_bar_enabled()) == before
    with library_progress(True):
        assert (are_progress_bars_disabled(), hf_logging.is_progress_bar_enabled()) == before


def test_demo_runs_on_a_fixed_thread_count_unless_told(tmp_path, monkeypatch):
    """Item 20 of issue 25: the demo ran on torch's default thread count, and its table changes in the last digits
    with it (98.1% at 1 thread against the documented 98.4% at 2). It now runs on DEMO_THREADS (2) unless --threads
    says otherwise, records the count in results.json and prints it, and gives the caller's count back."""
    import ahn.demo.run as demo_run
    from ahn.cli import main

    seen = []
    monkeypatch.setattr(demo_run, "run_demo", lambda **kw: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    assert main(["demo", "--out", str(tmp_path / "a")]) == 0
    assert main(["demo", "--out", str(tmp_path / "b"), "--threads", "1"]) == 0
    assert seen == [demo_run.DEMO_THREADS, 1] and demo_run.DEMO_THREADS == 2 and torch.get_num_threads() == before
    lines = []
    monkeypatch.undo()
    tiny = demo_run.DemoSettings(steps=1, batch_size=2, train_examples=2, eval_examples=2)
    results = demo_run.run_demo(out=tmp_path / "c", settings=tiny, progress=False, print_fn=lines.append)
    assert results["threads"] == torch.get_num_threads() and f"s on {results['threads']} threads;" in lines[-1]
