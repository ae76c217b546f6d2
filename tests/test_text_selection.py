"""The offline ablation of the salience scorer's inputs (`python -m ahn.demo.text.selection`): its activations match
the model's, the fit lowers the distillation's own loss, and the buffer count is the top-M rule."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import tiny_model

from ahn._shipped import load_text_teacher
from ahn.demo.text import corpus, tasks
from ahn.demo.text.probe import main as probe_main
from ahn.demo.text.selection import (INPUTS, TARGET, ablation, activations, fit_scorer, format_row, header,
                                     kept_values, main)
from ahn.demo.text.teacher import WEIGHTS_DIR, teacher_task_words


def test_activations_are_the_layers_inputs_and_softmax_column_sums():
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    acts = activations(model, ids, window=5, sinks=2)
    layer0 = model.model.layers[0]
    with torch.no_grad():
        normed = layer0.input_layernorm(model.model.embed_tokens(torch.tensor([ids])))[0]
    torch.testing.assert_close(acts.x[0], normed, rtol=1e-5, atol=1e-5)
    Hkv = model.config.num_key_value_heads
    assert all(m.shape == (Hkv, 20) for m in acts.mass + acts.far + acts.key_norm)
    # Each query's window softmax sums to one, so the window mass over all keys is the number of queries; the far mass
    # counts only queries at least 5 later: the first 5 queries' and the last 5 keys' shares are zero.
    torch.testing.assert_close(acts.mass[1].sum(-1), torch.full((Hkv,), 20.0), rtol=1e-5, atol=1e-5)
    assert (acts.far[1][:, -5:] == 0).all() and acts.far[1].sum() <= Hkv * 15 + 1e-4
    assert acts.far[1][:, :15].gt(0).all()


def test_kept_values_is_the_top_m_of_what_has_left_the_window():
    ex = tasks.TextExample("recall", list(range(40)), [-100] * 40, 40, answers=["a", "b"],
                           value_spans=[(10, 11), (30, 31)], answer_spans=[(35, 36), (38, 39)])
    score = torch.zeros(40)
    score[10] = 5.0  # value 1 ranks first; value 2 (slot 30) is within the window of its query (37): not asked
    assert kept_values(ex, score, window=8, sinks=2, slots=1) == (1, 1)
    score[5] = 9.0  # a better token evicted before the query takes the only slot
    assert kept_values(ex, score, window=8, sinks=2, slots=1) == (0, 1)
    assert kept_values(ex, score, window=8, sinks=2, slots=2) == (1, 1)
    score[30] = 9.5  # with a 5-token window value 2 is asked too, and it takes the slot from everything else
    assert kept_values(ex, score, window=5, sinks=2, slots=1) == (1, 2)


def test_on_the_shipped_teacher_the_fit_lowers_the_loss_and_the_retrieving_layer_keeps_values():
    model, tokenizer = load_text_teacher()
    words = teacher_task_words(WEIGHTS_DIR)
    haystack = tasks.token_stream(tokenizer, [corpus.sample_text()])
    rng = random.Random(0)
    train = [tasks.recall_example(tokenizer, words, 8, 512, rng, haystack) for _ in range(3)]
    test = {6: [tasks.recall_example(tokenizer, words, 6, 512, rng, haystack) for _ in range(2)]}
    acts = [activations(model, ex.input_ids, 128, 8) for ex in train]
    candidates = (torch.arange(512) >= 8) & (torch.arange(512) + 128 <= 511)
    _, first, last = fit_scorer(acts, candidates, 1, 0, True, True, steps=50)
    assert last < first
    rows = ablation(model, train, test, window=128, sinks=8, slots=16)
    assert [(r.layer, r.head) for r in rows] == [(i, h) for i in range(4) for h in range(2)]
    assert all(set(r.kept) == {*INPUTS, TARGET} and r.asked[6] > 0 for r in rows)
    # Layer 1 retrieves (the probe's finding): its heads keep the values far more often than chance (16 of ~370).
    assert max(r.kept["token"][6] for r in rows if r.layer == 1) >= 0.5
    table = header([6], 16) + "\n" + "\n".join(format_row(r) for r in rows)
    assert table.count("\n| ") == len(rows) + 2


def test_training_examples_of_different_lengths_are_refused():
    short, long = (tasks.TextExample("recall", [0] * n, [-100] * n, n) for n in (10, 12))
    with pytest.raises(ValueError, match="one length"):
        ablation(None, [short, long], {}, window=4, sinks=1, slots=2)


@pytest.mark.parametrize("cli", [main, probe_main])
@pytest.mark.parametrize("argv, message", [(["--window", "1024"], "no token of --length 1024 beyond the window"),
                                           (["--length", "2000"], "beyond the teacher's context of 1024")])
def test_the_clis_refuse_settings_with_nothing_to_count(cli, argv, message, capsys):
    """Both offline analyses of the text teacher (this ablation and the probe) check their shared options."""
    with pytest.raises(SystemExit):
        cli(argv)
    assert message in capsys.readouterr().err
