"""The training-free probe of a teacher's keys (`python -m ahn.demo.text.probe`): what it records, the delta rule it
reads with, and its verdict on the shipped text teacher."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model

from ahn._shipped import load_text_teacher
from ahn.demo.text import corpus, tasks
from ahn.demo.text.probe import delta_reads, format_rows, probe, record_qkv
from ahn.demo.text.teacher import WEIGHTS_DIR, teacher_task_words


def test_recording_changes_nothing_and_gives_every_layers_qkv():
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    before = model.config._attn_implementation
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    records = record_qkv(model, ids)
    assert model.config._attn_implementation == before
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain)
    cfg = model.config
    D = cfg.hidden_size // cfg.num_attention_heads
    assert sorted(records) == list(range(cfg.num_hidden_layers))
    q, k, v = records[0]
    assert q.shape == (2, cfg.num_attention_heads, 24, D) and k.shape == v.shape == (2, cfg.num_key_value_heads, 24, D)
    # Layer 0's keys are its k_proj of the embedded, normed tokens, rotated: RoPE keeps each key's norm.
    attn, norm = model.model.layers[0].self_attn, model.model.layers[0].input_layernorm
    with torch.no_grad():
        raw = attn.k_proj(norm(model.model.embed_tokens(ids))).view(2, 24, -1, D).transpose(1, 2)
    torch.testing.assert_close(k.norm(dim=-1), raw.norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_delta_reads_return_what_orthonormal_keys_stored_and_the_last_write_of_a_repeated_key():
    g = torch.Generator().manual_seed(1)
    keys = torch.linalg.qr(torch.randn(8, 8, generator=g))[0][:5]  # 5 orthonormal rows
    values = torch.randn(5, 3, generator=g)
    torch.testing.assert_close(delta_reads(keys, values, [5] * 5, keys), values, rtol=1e-5, atol=1e-5)
    # Read i after i + 1 writes: key i's value; key 4 read after 4 writes: nothing stored under it yet.
    early = delta_reads(keys, values, [1, 2, 3, 4, 4], keys)
    torch.testing.assert_close(early[:4], values[:4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(early[4], torch.zeros(3), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="non-decreasing"):
        delta_reads(keys, values, [3, 2], keys[:2])
    again = torch.cat([keys, keys[:1]]), torch.cat([values, -values[:1]])  # the delta rule overwrites, not adds
    torch.testing.assert_close(delta_reads(*again, [6], keys[:1])[0], -values[0], rtol=1e-5, atol=1e-5)
    x = F.normalize(torch.randn(1, 8, generator=g), dim=-1)  # a mix of the values, by its overlap with each key
    torch.testing.assert_close(delta_reads(keys, values, [5], x), (x @ keys.T) @ values, rtol=1e-5, atol=1e-5)


def test_the_shipped_teacher_retrieves_in_one_layer_and_its_keys_hold_pairs_for_a_selective_memory():
    """On the repository's sample text: the heads that put almost all their attention on the value exist, and a
    memory written with the pairs' values only answers most of their queries (the probe's reason to exist: the
    docs' figures come from the essays and more examples)."""
    model, tokenizer = load_text_teacher()
    words = teacher_task_words(WEIGHTS_DIR)
    haystack = tasks.token_stream(tokenizer, [corpus.sample_text()])
    rng = random.Random(0)
    examples = [tasks.recall_example(tokenizer, words, 6, 512, rng, haystack) for _ in range(2)]
    rows = probe(model, examples, window=128, sinks=8)
    retrieving = [r for r in rows if r.attention_on_value > 0.9]
    assert retrieving and all(r.queries > 0 for r in rows)
    assert sum(r.values for r in retrieving) / len(retrieving) >= 0.6
    assert all(0 <= r.every <= 1 and 0 <= r.values <= 1 for r in rows)
    table = format_rows(rows, 6)
    assert table.count("\n| ") == len(rows) + 2  # a header, its rule and a row per head
