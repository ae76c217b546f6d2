"""Salience at eviction, the priority buffer and the deferring read-out (ahn.salience).

The blocked attention is checked against a token-by-token reference written from the
definitions; the model's guarantees (parallel == chunked prefill + decode, padding, generate,
save / load, every family) are checked with every option on.
"""

from __future__ import annotations

import copy

import pytest
import torch

import ahn
from ahn import AHNConfig
from ahn.distill.losses import evictable_positions, salience_loss
from ahn.model import cache_kwargs
from ahn.attention import gather_sinks, window_attention
from ahn.cache import Buffer
from ahn.salience import SalienceRecord, SalienceScorer
from helpers import (
    ATOL, MEMORIES, assert_padded_rows_generate_as_alone, ids, load_base, logits, randomize_memory, randomize_salience,
    run_incremental,
)

ALL_ON = dict(buffer_slots=3, salience_writes=True, readout="defer")
OPTIONS = [ALL_ON, dict(buffer_slots=2), dict(salience_writes=True), dict(readout="defer"),
           dict(buffer_slots=2, salience_writes=True, salience_mass=False, readout="defer")]


def reference_attention(q, k, v, token_part, mass_weight, *, window, sinks, pad, slots, scale, stride=1):
    """Token by token, from the definitions: one row (``q [Hq, T, D]``, ``k, v [Hkv, T, D]``, ``pad`` left pads).

    Per query t: the window softmax (sinks + window) gives each key its received mass (queries at slots divisible
    by ``stride`` only, each counted ``stride`` times); the token
    t - W is scored ``token_part + mass_weight * log1p(mass)`` and joins the evicted set; the buffer
    is the top ``slots`` evicted tokens by (score, slot); the output attends over sinks, window and buffer.
    """
    Hq, T, D = q.shape
    Hkv = k.shape[0]
    R = Hq // Hkv
    mass = torch.zeros(Hkv, T, dtype=torch.float64)
    scores = {}
    out = torch.zeros(Hq, T, D, dtype=torch.float64)
    for t in range(T):
        if t < pad:
            continue
        sink_set = [j for j in range(pad, min(pad + sinks, t + 1))]
        win = [j for j in range(max(pad + sinks, t - window + 1), t + 1)]
        e = t - window
        if e >= pad + sinks:
            for h in range(Hkv):
                scores[(h, e)] = float(token_part[h, e] + mass_weight[h] * torch.log1p(mass[h, e]))
        for hq in range(Hq):
            h = hq // R
            base = sink_set + win
            evicted = sorted((j for (hh, j) in scores if hh == h), key=lambda j: (scores[(h, j)], j), reverse=True)
            buf = evicted[:slots]
            keys = base + buf
            logit = (k[h, keys].double() @ q[hq, t].double()) * scale
            p = torch.softmax(logit, 0)
            out[hq, t] = p @ v[h, keys].double()
            pw = torch.softmax(logit[: len(base)], 0)  # the window's own softmax
            for j, pj in zip(base[len(sink_set):], pw[len(sink_set):]):
                mass[h, j] += float(pj) / R * stride if t % stride == 0 else 0.0
    return out


@pytest.mark.parametrize("window, sinks, slots, block, pad, stride", [
    (5, 2, 3, 4, 0, 1), (4, 0, 2, 7, 3, 1), (6, 1, 1, 64, 2, 1),
    (5, 2, 3, 4, 0, 2), (6, 1, 2, 7, 3, 3),  # the received mass estimated from every 2nd / 3rd query
])
def test_blocked_attention_equals_the_token_by_token_reference(window, sinks, slots, block, pad, stride):
    torch.manual_seed(0)
    B, Hq, Hkv, T, D, hidden = 1, 4, 2, 29, 8, 16
    q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    scorer = SalienceScorer(hidden, Hkv)
    with torch.no_grad():
        scorer.mass_weight.copy_(torch.tensor([1.5, -2.0]))
    token_part = torch.randn(B, Hkv, T)
    P = torch.tensor([pad])
    with torch.no_grad():
        out, lse, scores, buffer, _ = window_attention(
            q, k, v, 0, gather_sinks(k, P, sinks), gather_sinks(v, P, sinks), start=0, window=window, sinks=sinks,
            pad_offsets=P, scale=D**-0.5, block=block, scorer=scorer, token_part=token_part,
            mass=torch.zeros(B, Hkv, T), buffer=Buffer.empty(k, v, slots), mass_stride=stride)
    ref = reference_attention(q[0], k[0], v[0], token_part[0], scorer.mass_weight.detach(), window=window, sinks=sinks,
                              pad=pad, slots=slots, scale=D**-0.5, stride=stride)
    got = out[0].transpose(0, 1)  # [Hq, T, D]
    torch.testing.assert_close(got[:, pad:].double(), ref[:, pad:], rtol=0, atol=1e-5)
    # The final buffer holds exactly the best `slots` evicted tokens of each head.
    evicted = torch.arange(T - window) >= pad + sinks
    for h in range(Hkv):
        s = scores[0, h, window:][evicted[: T - window]] if T > window else None
        cand = torch.arange(T - window)[evicted[: T - window]]
        best = sorted(zip(s.tolist(), cand.tolist()), reverse=True)[:slots]
        assert sorted(buffer.slot[0, h].tolist()) == sorted(j for _, j in best)


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("memory", MEMORIES)
def test_parallel_forward_equals_prefill_plus_decode(model_dirs, memory, options):
    x = ids(2, 90, seed=3)
    model = ahn.add_memory(load_base(model_dirs), AHNConfig(memory=memory, window=10, sinks=3, attention_block=7, **options))
    randomize_memory(model)
    randomize_salience(model)
    parallel = logits(model, x)
    incremental, cache = run_incremental(model, x, [5, 13, 1, 27])
    torch.testing.assert_close(incremental, parallel, rtol=0, atol=ATOL)
    M = options.get("buffer_slots", 0)
    assert cache.kv_length == 3 + M + 10
    layer = cache.layers[0]
    if M:
        assert layer.buffer_slot.shape == (2, 2, M) and (layer.buffer_slot >= 0).all()  # full after 90 tokens
        assert all(0 <= s <= 90 - 1 - 10 for s in layer.buffer_slot.flatten().tolist())


def test_a_strided_mass_is_the_same_in_every_form(model_dirs):
    """``salience_mass_stride``: the received mass counts the queries at slots divisible by the stride (3 here) in
    the parallel forward, in chunked prefill and in decode alike, so they stay equal; and it is a different
    estimate from the exact mass (the option takes effect)."""
    x = ids(2, 90, seed=3)
    runs = {}
    for stride in (1, 3):
        model = ahn.add_memory(load_base(model_dirs), AHNConfig(window=10, sinks=3, attention_block=7,
                                                                salience_mass_stride=stride, **ALL_ON))
        randomize_memory(model)
        randomize_salience(model)
        parallel = logits(model, x)
        incremental, cache = run_incremental(model, x, [5, 13, 1, 27])
        torch.testing.assert_close(incremental, parallel, rtol=0, atol=ATOL)
        runs[stride] = torch.stack([layer.salience_mass for layer in cache.layers])
    exact, strided = runs[1], runs[3]
    assert exact.shape == strided.shape
    assert (strided - exact).abs().max() > 1e-3  # an estimate, not the exact sum
    torch.testing.assert_close(strided.sum(), exact.sum(), rtol=0.2, atol=0)  # of the same quantity


def test_the_mass_stride_default_keeps_about_256_queries_per_token():
    assert AHNConfig(window=300).mass_stride_for(300) == 1  # exact below 512
    assert AHNConfig().mass_stride_for(2048) == 8
    assert AHNConfig().mass_stride_for(32640) == 127
    assert AHNConfig(salience_mass_stride=1).mass_stride_for(32640) == 1


@pytest.mark.parametrize("family", ["qwen3", "llama", "mistral"])
def test_every_family_with_the_options_on(model_dirs, family):
    x = ids(2, 50, seed=4)
    model = ahn.add_memory(load_base(model_dirs, family), AHNConfig(window=8, sinks=2, attention_block=5, **ALL_ON))
    randomize_memory(model)
    randomize_salience(model)
    parallel = logits(model, x)
    incremental, _ = run_incremental(model, x, [9, 4])
    torch.testing.assert_close(incremental, parallel, rtol=0, atol=ATOL)


def test_torch_decode_backend_agrees(model_dirs):
    x = ids(1, 40, seed=5)
    outs = []
    for backend in ("torch", "auto"):
        torch.manual_seed(0)  # the same memory initialisation
        model = ahn.add_memory(load_base(model_dirs), AHNConfig(window=6, sinks=1, backend=backend, **ALL_ON))
        randomize_memory(model)
        randomize_salience(model)
        outs.append(run_incremental(model, x, [7])[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=ATOL)


def test_a_fresh_memory_changes_nothing_but_the_buffer(model_dirs):
    """Zero output projection: the memory adds nothing, with either read-out; what remains is the attention
    over sinks + window (+ the buffer). Without a buffer that is plain sinks + window (invariant 2)."""
    x = ids(2, 60)
    base = load_base(model_dirs)
    plain = ahn.add_memory(copy.deepcopy(base), AHNConfig(window=8, sinks=2))
    with plain.attention_mode("window"):
        window_only = logits(plain, x)
    for options in (dict(readout="defer"), dict(salience_writes=True, readout="defer")):
        model = ahn.add_memory(copy.deepcopy(base), AHNConfig(window=8, sinks=2, **options))
        randomize_salience(model)
        torch.testing.assert_close(logits(model, x), window_only, rtol=0, atol=ATOL)
    buffered = ahn.add_memory(copy.deepcopy(base), AHNConfig(window=8, sinks=2, buffer_slots=4))
    assert (logits(buffered, x) - window_only).abs().max() > 1e-3, "the buffer must let evicted tokens be seen"
    with buffered.attention_mode("window"):  # "window" mode is the plain baseline: no buffer
        torch.testing.assert_close(logits(buffered, x), window_only, rtol=0, atol=0)


def test_padded_rows_generate_as_alone(model_dirs):
    model = ahn.add_memory(load_base(model_dirs), AHNConfig(window=6, sinks=2, **ALL_ON))
    randomize_memory(model)
    randomize_salience(model)
    assert_padded_rows_generate_as_alone(model)


def test_generate_greedy_sampling_and_beam(model_dirs):
    model = ahn.add_memory(load_base(model_dirs), AHNConfig(window=5, sinks=1, **ALL_ON))
    randomize_memory(model)
    randomize_salience(model)
    prompt = ids(1, 12)
    with torch.no_grad():
        greedy = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
        full = logits(model, greedy[:, :-1])
        assert torch.equal(full[:, 11:].argmax(-1), greedy[:, 12:])  # decode continues the parallel forward
        cache = model.new_cache()
        sampled = model.generate(ids(2, 20), **cache_kwargs(model, cache), max_new_tokens=8, do_sample=True, top_k=5,
                                 pad_token_id=0)
        assert sampled.shape == (2, 28) and cache.kv_length == 1 + 3 + 5
        beams = model.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    assert beams.shape == (1, 18)


def test_save_and_load_round_trip(model_dirs, tmp_path):
    model = ahn.add_memory(load_base(model_dirs), AHNConfig(memory="deltanet", window=8, sinks=2, **ALL_ON))
    randomize_memory(model)
    randomize_salience(model)
    x = ids(1, 40)
    before = logits(model, x)
    model.save_pretrained(tmp_path / "a")
    loaded = ahn.AHNModel.from_pretrained(load_base(model_dirs), tmp_path / "a")
    assert loaded.ahn_config == model.ahn_config
    torch.testing.assert_close(logits(loaded, x), before, rtol=0, atol=0)
    names = {n for n, _ in loaded.named_memory_parameters()}
    assert any(".salience.proj." in n for n in names) and any(".defer." in n for n in names)


def test_overrides_that_change_the_learned_weights_are_refused(model_dirs, tmp_path):
    model = ahn.add_memory(load_base(model_dirs), AHNConfig(window=8, sinks=2, **ALL_ON))
    model.save_pretrained(tmp_path / "a")
    resized = ahn.AHNModel.from_pretrained(load_base(model_dirs), tmp_path / "a", buffer_slots=6)
    assert resized.ahn_config.buffer_slots == 6  # a scorer ranks for any M
    for overrides in (dict(readout="add"), dict(buffer_slots=0, salience_writes=False)):
        with pytest.raises(ValueError, match="change which learned weights"):
            ahn.AHNModel.from_pretrained(load_base(model_dirs), tmp_path / "a", **overrides)
    plain = ahn.add_memory(load_base(model_dirs), AHNConfig(window=8, sinks=2))
    plain.save_pretrained(tmp_path / "p")
    with pytest.raises(ValueError, match="buffer_slots=0, salience_writes=False, readout='add'"):
        ahn.AHNModel.from_pretrained(load_base(model_dirs), tmp_path / "p", buffer_slots=4)


def test_the_options_off_add_no_parameters(model_dirs):
    model = ahn.add_memory(load_base(model_dirs), AHNConfig())
    assert not [n for n, _ in model.named_memory_parameters() if ".salience." in n or ".defer." in n]


def test_cache_accounts_for_the_buffer(model_dirs):
    model = ahn.add_memory(load_base(model_dirs), AHNConfig(window=8, sinks=2, buffer_slots=4, layers=[1]))
    with torch.no_grad():
        _, cache = run_incremental(model, ids(1, 30), [12])
    assert [layer.kv_length for layer in cache.layers] == [2 + 8, 2 + 4 + 8]
    assert cache.kv_length == 14
    plain = ahn.add_memory(load_base(model_dirs), AHNConfig(window=8, sinks=2, layers=[1]))
    _, plain_cache = run_incremental(plain, ids(1, 30), [12])
    # Layer 1's buffer: 4 k/v entries per kv head, their slots and scores, and the window's salience.
    extra = 2 * (4 * 2 * 12 * 4) + 2 * 4 * (8 + 4) + 2 * 8 * 2 * 4
    assert cache.nbytes - plain_cache.nbytes == extra
    with pytest.raises(ValueError, match="buffer slots"):
        model(ids(1, 4), **cache_kwargs(model, plain_cache))


@pytest.mark.parametrize("kwargs, match", [(dict(buffer_slots=-1), "buffer_slots"), (dict(readout="mix"), "readout"),
                                           (dict(salience_writes=1), "salience_writes"),
                                           (dict(salience_mass_stride=0), "salience_mass_stride=0 must be an int >= 1"),
                                           # Issue 25.14: refused at once, not at the first forward's allocation.
                                           (dict(buffer_slots=10**9, window=4),
                                            "buffer_slots=1000000000 is above the bound of 65536 slots")])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AHNConfig(**kwargs)


def test_records_scores_and_the_teachers_mass(model_dirs):
    model = ahn.add_memory(load_base(model_dirs), AHNConfig(window=6, sinks=2, buffer_slots=2))
    x = ids(2, 30)
    teacher, student = SalienceRecord(probe_window=6), SalienceRecord()
    with torch.no_grad():
        with model.attention_mode("window"):
            window_full = logits(model, x, window=30, sinks=0, salience_record=teacher)
        with model.attention_mode("full"):
            torch.testing.assert_close(window_full, logits(model, x), rtol=0, atol=ATOL)
        logits(model, x, salience_record=student)
    assert sorted(teacher.teacher_mass) == [0, 1] and sorted(student.scores) == [0, 1]
    mass, scores = teacher.teacher_mass[1], student.scores[1]  # [B, Hkv, T]
    assert mass.shape == scores.shape == (2, 2, 30)
    # Only tokens a query at least 6 later attends receive mass: none of the last 6.
    assert (mass[..., -6:] == 0).all() and (mass[..., :-6] > 0).all()
    evicted = torch.isfinite(scores)
    assert evicted[..., 2:24].all() and not evicted[..., :2].any() and not evicted[..., 24:].any()
    with pytest.raises(ValueError, match="salience_record"):
        with model.attention_mode("full"):
            logits(model, x, salience_record=student)


def test_salience_loss():
    candidates = torch.tensor([[False, True, True, True, False]])
    target = torch.tensor([[[5.0, 1.0, 3.0, 0.0, 9.0]]])
    perfect = torch.log(torch.tensor([[[1.0, 1.0, 3.0, 1e-9, 1.0]]]))
    flat = torch.zeros(1, 1, 5, requires_grad=True)
    assert salience_loss(perfect, target, candidates) < salience_loss(flat, target, candidates)
    salience_loss(flat, target, candidates).backward()
    assert flat.grad[0, 0, 0] == 0 and flat.grad[0, 0, 2] < 0 < flat.grad[0, 0, 3]  # raise token 2, lower token 3
    empty = torch.zeros_like(candidates)
    scores = torch.full((1, 1, 5), float("-inf"), requires_grad=True)
    loss = salience_loss(scores, target, empty)
    loss.backward()
    assert loss == 0 and torch.isfinite(scores.grad).all()
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]])
    assert evictable_positions(mask, window=3, sinks=1).tolist() == [
        [False, False, True, True, True, False, False, False], [False, True, True, False, False, False, False, False]]


def test_gradients_do_not_depend_on_the_attention_block(model_dirs):
    """Blocks run under activation checkpointing when training: any block length gives the same gradients,
    and the scorer (through the gated writes) and the deferring logit receive them."""
    x = ids(2, 40, seed=7)
    grads = []
    for block in (5, 64):
        torch.manual_seed(0)
        model = ahn.add_memory(load_base(model_dirs), AHNConfig(window=8, sinks=2, attention_block=block, **ALL_ON))
        randomize_memory(model)
        randomize_salience(model)
        model(x, use_cache=False).logits.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_memory_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][n], rtol=1e-4, atol=1e-6, msg=n)
    assert all(grads[0][n].abs().sum() > 0 for n in grads[0] if ".salience.proj." in n or ".defer." in n)


def test_bfloat16_model_with_the_options(model_dirs):
    model = ahn.add_memory(load_base(model_dirs).to(torch.bfloat16), AHNConfig(window=8, sinks=2, **ALL_ON))
    randomize_memory(model)
    randomize_salience(model)
    x = ids(2, 40)
    parallel = logits(model, x)
    incremental, cache = run_incremental(model, x, [9])
    assert parallel.dtype == torch.bfloat16 and cache.layers[0].keys.dtype == torch.bfloat16
    torch.testing.assert_close(incremental.float(), parallel.float(), rtol=0, atol=0.05)
    model(x, use_cache=False).logits.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in model.named_memory_parameters())


def test_ties_go_to_the_newer_token(model_dirs):
    """All scores equal (a zero scorer): the buffer holds the M most recently evicted tokens, in every form."""
    model = ahn.add_memory(load_base(model_dirs), AHNConfig(window=6, sinks=2, buffer_slots=3, attention_block=4))
    with torch.no_grad():
        for name, p in model.named_memory_parameters():
            if ".salience." in name:
                p.zero_()
    x = ids(2, 30, seed=9)
    parallel = logits(model, x)
    incremental, cache = run_incremental(model, x, [7, 5])
    torch.testing.assert_close(incremental, parallel, rtol=0, atol=ATOL)
    newest = [30 - 1 - 6 - i for i in range(3)]  # the last three tokens to leave the window
    for layer in cache.layers:
        assert all(sorted(row.tolist()) == sorted(newest) for row in layer.buffer_slot.flatten(0, 1))
    with torch.no_grad():  # a prefill of the whole sequence keeps the same three
        cache = model.new_cache()
        model(x, **cache_kwargs(model, cache))
    assert all(sorted(row.tolist()) == sorted(newest) for row in cache.layers[0].buffer_slot.flatten(0, 1))


def test_the_old_readout_name_still_loads(model_dirs, tmp_path):
    """readout="paper" was renamed "add": configs and adapters written with the old name load, with a FutureWarning."""
    with pytest.warns(FutureWarning, match="readout='paper' is renamed readout='add'"):
        assert AHNConfig(readout="paper").readout == "add"
    model = ahn.add_memory(load_base(model_dirs), AHNConfig(window=8, sinks=2))
    model.save_pretrained(tmp_path / "a")
    config = tmp_path / "a" / "ahn_config.json"
    config.write_text(config.read_text().replace('"readout": "add"', '"readout": "paper"'))
    with pytest.warns(FutureWarning, match="renamed"):
        loaded = ahn.AHNModel.from_pretrained(load_base(model_dirs), tmp_path / "a")
    assert loaded.ahn_config.readout == "add"


def test_the_buffer_rule_on_the_host_makes_the_tensor_rules_decisions():
    """CPU decoding offers each evicted token to the buffer with host-side lists (``_offer_on_host``); it must
    keep the same entries in the same places as the tensor form used on GPUs, with ties (equal scores, then the
    newer slot wins), empty entries, rows whose evicted token is padding, and a buffer that fills up."""
    from ahn.cache import AHNCacheLayer

    g = torch.Generator().manual_seed(3)
    B, H, M, W, S, D = 3, 2, 4, 8, 2, 5

    def layer():
        lay = AHNCacheLayer(W, S, buffer_slots=M)
        lay.lazy_initialization(torch.zeros(B, H, 1, D), torch.zeros(B, H, 1, D), salience=True)
        lay.keys = torch.randn(B, H, S + M + W, D, generator=g)
        lay.values = torch.randn(B, H, S + M + W, D, generator=g)
        return lay

    host, tensors = layer(), layer()
    tensors.keys, tensors.values = host.keys.clone(), host.values.clone()
    replaced = 0
    for t in range(W + S, W + S + 40):
        score = torch.randint(0, 4, (B, H, 1), generator=g).float()  # few values: many ties
        valid = torch.rand(B, 1, 1, generator=g) > 0.2 if t % 5 else None  # None: every row's token is real
        i = host.ring_start + (t - W) % W
        for lay in (host, tensors):  # a fresh evicted token at its ring entry
            lay.keys[:, :, i], lay.values[:, :, i] = float(t), -float(t)
        before = host.buffer_slot.clone()
        host._offer_on_host(t - W, i, score, valid)
        tensors._offer_with_tensors(t - W, i, score, valid)
        replaced += int((host.buffer_slot != before).sum())
        assert torch.equal(host.buffer_slot, tensors.buffer_slot), t
        assert torch.equal(host.buffer_score, tensors.buffer_score), t
        assert torch.equal(host.keys, tensors.keys) and torch.equal(host.values, tensors.values), t
    assert replaced > B * H * M  # the buffers filled and entries were replaced after that
    assert (host.buffer_slot >= 0).all()
