"""The AHN model on tiny random Qwen2 / Qwen3 models: the invariants of docs/design.md and the user API."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import ahn
from ahn import AHNCache, AHNConfig, AHNModel
from ahn.model import cache_kwargs
from helpers import (
    ATOL, FAMILIES, LOGITS_ATOL, MEMORIES, VOCAB, assert_padded_rows_generate_as_alone, ids, load_base, logits,
    randomize_memory, run_incremental, tiny_config, tiny_model,
)


# ------------------------------------------------------------------------------ invariants
@pytest.mark.parametrize("family, attn_implementation",
                         [(f, "sdpa") for f in FAMILIES] + [("qwen2", "eager"), ("llama", "eager")])
def test_full_mode_is_the_base_model(model_dirs, family, attn_implementation):
    """"full" is the base model's own attention implementation, untouched: bit-identical logits, padded
    batches and its own cache included."""
    x = ids(2, 50)
    mask = torch.ones_like(x)
    mask[1, :7] = 0
    base = load_base(model_dirs, family, attn_implementation)
    ref, ref_padded = logits(base, x), logits(base, x, attention_mask=mask)
    gen = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref_generated = base.generate(x, **gen)
    model = ahn.add_memory(load_base(model_dirs, family, attn_implementation), AHNConfig(window=8, sinks=2))
    randomize_memory(model)
    assert model.config._attn_implementation == "ahn"
    with model.attention_mode("full"):
        assert model.config._attn_implementation == attn_implementation
        torch.testing.assert_close(logits(model, x), ref, rtol=0, atol=0)
        torch.testing.assert_close(logits(model, x, attention_mask=mask), ref_padded, rtol=0, atol=0)
        with torch.no_grad():
            assert torch.equal(model.generate(x, **gen), ref_generated)
    assert model.mode == "ahn" and model.config._attn_implementation == "ahn"


@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_short_sequences_equal_the_base_model(model_dirs, memory, sinks, family):
    x = ids(2, 30)
    ref = logits(load_base(model_dirs, family), x)
    model = ahn.add_memory(load_base(model_dirs, family), AHNConfig(memory=memory, window=30 - sinks, sinks=sinks))
    randomize_memory(model)  # even a trained memory must read nothing when nothing was evicted
    torch.testing.assert_close(logits(model, x), ref, rtol=0, atol=ATOL)
    # The cached path too: prefill + decode.
    with torch.no_grad():
        cache = model.new_cache()
        a = model(x[:, :17], **cache_kwargs(model, cache)).logits
        b = torch.cat([model(x[:, t : t + 1], **cache_kwargs(model, cache)).logits for t in range(17, 30)], 1)
    torch.testing.assert_close(torch.cat([a, b], 1), ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("memory", MEMORIES)
def test_fresh_adapter_equals_sinks_plus_window(model_dirs, memory):
    x = ids(2, 70)
    model = ahn.add_memory(load_base(model_dirs), AHNConfig(memory=memory, window=16, sinks=4))
    with model.attention_mode("window"):
        window_only = logits(model, x)
    with model.attention_mode("full"):
        full = logits(model, x)
    fresh = logits(model, x)
    torch.testing.assert_close(fresh, window_only, rtol=0, atol=0)
    assert (fresh[:, 20:] - full[:, 20:]).abs().max() > 1e-3, "the window must actually cut the context"
    torch.testing.assert_close(fresh[:, :20], full[:, :20], rtol=0, atol=ATOL)


@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_parallel_forward_equals_prefill_plus_decode(model_dirs, memory, sinks, family):
    x = ids(2, 90, seed=3)
    config = AHNConfig(memory=memory, window=10, sinks=sinks, attention_block=7)  # blocks straddle the window
    model = ahn.add_memory(load_base(model_dirs, family), config)
    randomize_memory(model)
    parallel = logits(model, x)
    with model.attention_mode("window"):
        assert (parallel - logits(model, x)).abs().max() > 1e-3, "the memory must contribute"
    incremental, cache = run_incremental(model, x, [5, 13, 1, 27])
    torch.testing.assert_close(incremental, parallel, rtol=0, atol=ATOL)
    # State size does not depend on T; KV entries are bounded by sinks + window.
    layer = cache.layers[0]
    assert layer.memory_state.shape == (2, 4, 12, 12)
    assert cache.kv_length == sinks + 10


@pytest.mark.parametrize("memory", MEMORIES)
def test_fused_decode_equals_gates_step_output(memory):
    """Memory.decode (one matmul for every projection of the token) == write_gates + step + output,
    with a row masked, GQA, an empty state, and weights written in place between tokens (.data too)."""
    torch.manual_seed(0)
    m = ahn.memory.build_memory(memory, hidden_size=16, num_heads=4, head_dim=8).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    B = 3
    x, q = torch.randn(B, 16, dtype=torch.float64), torch.randn(B, 4, 8, dtype=torch.float64)
    k, v = torch.randn(B, 2, 8, dtype=torch.float64), torch.randn(B, 2, 8, dtype=torch.float64)
    gates = m.write_gates(torch.randn(B, 16, dtype=torch.float64))
    mask = torch.tensor([True, False, True])
    with torch.no_grad():
        for state in (None, torch.randn(B, 4, 8, 8, dtype=torch.float64)):
            for p in m.parameters():  # bypasses version counters: nothing may be cached across calls
                p.data.mul_(1.1)
            out, new_gates, new_state = m.decode(x, q, k, v, gates, mask, state)
            o, ref_state = m.step(q, k, v, gates, mask, state)
            # Gates are float32 whatever the module's dtype, and decode computes every projection in one matmul
            # while write_gates runs them one by one: they agree to float32's rounding, not float64's.
            torch.testing.assert_close(new_gates, m.write_gates(x), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(out, m.output(o, x), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(new_state, ref_state, rtol=0, atol=0)
        out, new_gates, new_state = m.decode(x, q, None, None, None, None, None)
        assert out is None and new_state is None  # nothing written yet: nothing to read


def test_cache_is_bounded_and_constant_in_length(model_dirs):
    model = ahn.add_memory(load_base(model_dirs), AHNConfig(window=12, sinks=4))
    sizes = {}
    for T in (40, 200):
        _, cache = run_incremental(model, ids(1, T), [T - 3])
        sizes[T] = (cache.kv_length, cache.nbytes)
    assert sizes[40] == sizes[200]
    assert sizes[40][0] == 16
    with model.attention_mode("window"):
        _, cache = run_incremental(model, ids(1, 40), [30])
    assert cache.layers[0].memory_state is None and cache.nbytes < sizes[40][1]


def test_window_and_sinks_per_call_override(model_dirs):
    x = ids(1, 50)
    model = ahn.add_memory(load_base(model_dirs), AHNConfig(window=8, sinks=2))
    randomize_memory(model)
    a = logits(model, x, window=20, sinks=4)
    model2 = ahn.add_memory(load_base(model_dirs), AHNConfig(window=20, sinks=4))
    model2.base_model.load_state_dict(model.base_model.state_dict())
    torch.testing.assert_close(a, logits(model2, x), rtol=0, atol=0)
    assert model.ahn_config.window == 8, "a per-call override must not touch the config"
    with pytest.raises(ValueError, match="made for window=8"):
        model(x, **cache_kwargs(model, model.new_cache()), window=20)


def test_only_memory_trains_and_base_weights_stay_bit_identical(model_dirs):
    model = ahn.add_memory(load_base(model_dirs), AHNConfig(window=8, sinks=2))
    before = {n: p.detach().clone() for n, p in model.base_model.named_parameters() if ".ahn." not in n}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".ahn." in n for n in trainable)
    assert set(n for n, _ in model.named_memory_parameters()) == {n.removeprefix("base_model.") for n in trainable}
    opt = torch.optim.AdamW(model.memory_parameters(), lr=1e-2)
    x = ids(2, 40)
    for _ in range(3):
        loss = model(x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    moved = [n for n, p in model.named_memory_parameters() if n.endswith("o_proj.weight") and p.abs().sum() > 0]
    assert moved, "the memory's output projections must receive gradients"
    for n, p in model.base_model.named_parameters():
        if ".ahn." not in n:
            assert torch.equal(p, before[n]), f"base weight {n} changed"


def test_memory_on_a_subset_of_layers(model_dirs):
    model = ahn.add_memory(load_base(model_dirs), AHNConfig(window=8, sinks=2, layers=[1]))
    names = {n for n, _ in model.named_memory_parameters()}
    assert names and all(n.startswith("model.layers.1.") for n in names)
    randomize_memory(model)
    x = ids(1, 40)
    torch.testing.assert_close(run_incremental(model, x, [11])[0], logits(model, x), rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------ generate
@pytest.mark.parametrize("memory", MEMORIES)
def test_generate_batch_with_left_padding_equals_rows_alone(model_dirs, memory):
    model = ahn.add_memory(load_base(model_dirs), AHNConfig(memory=memory, window=6, sinks=2))
    randomize_memory(model)
    assert_padded_rows_generate_as_alone(model)


def test_generate_keeps_the_cache_bounded_and_samples(model_dirs):
    model = ahn.add_memory(load_base(model_dirs), AHNConfig(window=6, sinks=2))
    randomize_memory(model)
    cache = model.new_cache()
    with torch.no_grad():
        out = model.generate(ids(2, 20), **cache_kwargs(model, cache), max_new_tokens=15, do_sample=True, top_k=5,
                             pad_token_id=0)
    assert out.shape == (2, 35)
    assert cache.kv_length <= 8 and cache.get_seq_length() == 34  # the last token is not fed back


def test_decode_continues_a_parallel_prefill(model_dirs):
    """Greedy tokens from generate == argmax of one parallel forward over prompt + generated."""
    model = ahn.add_memory(load_base(model_dirs), AHNConfig(memory="mamba2", window=5, sinks=1))
    randomize_memory(model)
    with torch.no_grad():
        out = model.generate(ids(1, 12), max_new_tokens=10, do_sample=False, pad_token_id=0)
    full = logits(model, out[:, :-1])
    assert torch.equal(full[:, 11:].argmax(-1), out[:, 12:])


# ------------------------------------------------------------------------------ adapters
def test_save_and_load_round_trip(model_dirs, tmp_path):
    model = ahn.add_memory(load_base(model_dirs), AHNConfig(memory="mamba2", window=8, sinks=2))
    randomize_memory(model)
    x = ids(1, 40)
    expected = logits(model, x)
    path = tmp_path / "adapter"
    model.save_pretrained(path)
    model.save_pretrained(path)  # overwriting an existing adapter is atomic too
    assert sorted(os.listdir(path)) == ["ahn_adapter.safetensors", "ahn_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"], "no temporary files left behind"
    assert json.loads((path / "ahn_config.json").read_text())["memory"] == "mamba2"
    loaded = AHNModel.from_pretrained(load_base(model_dirs), path)
    torch.testing.assert_close(logits(loaded, x), expected, rtol=0, atol=0)
    wider = AHNModel.from_pretrained(load_base(model_dirs), path, window=30)
    assert wider.ahn_config.window == 30 and wider.ahn_config.memory == "mamba2"


def test_mismatched_adapters_fail_clearly(model_dirs, tmp_path):
    model = ahn.add_memory(load_base(model_dirs), AHNConfig(window=8, sinks=2))
    model.save_pretrained(tmp_path / "gdn")
    bigger = tiny_model(hidden_size=64, tie_word_embeddings=False)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.ahn\.\S+' has shape .* made for another base"):
        AHNModel.from_pretrained(bigger, tmp_path / "gdn")
    cfg = json.loads((tmp_path / "gdn" / "ahn_config.json").read_text())
    cfg["memory"] = "deltanet"
    (tmp_path / "gdn" / "ahn_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="which this model does not have"):
        AHNModel.from_pretrained(load_base(model_dirs), tmp_path / "gdn")
    cfg["memory"] = "lstm"
    (tmp_path / "gdn" / "ahn_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="memory='lstm' is unknown"):
        AHNModel.from_pretrained(load_base(model_dirs), tmp_path / "gdn")
    with pytest.raises(ValueError, match="is not a directory"):
        AHNModel.from_pretrained(load_base(model_dirs), tmp_path / "nothing")


@pytest.mark.parametrize("memory, impl", [("gated_deltanet", "GatedDeltaNet"), ("deltanet", "DeltaNet"), ("mamba2", "Mamba2")])
def test_loads_the_official_release_format(model_dirs, tmp_path, memory, impl):
    model = ahn.add_memory(load_base(model_dirs), AHNConfig(memory=memory, window=8, sinks=2))
    randomize_memory(model)
    x = ids(1, 40)
    expected = logits(model, x)
    official = {n.replace(".self_attn.ahn.", ".ahn.fn."): p.detach().clone() for n, p in model.named_memory_parameters()}
    if memory == "gated_deltanet":
        for i in range(2):
            official[f"model.layers.{i}.ahn.fn.D"] = torch.ones(4)  # stored by the release, unused
    save_file(official, tmp_path / "model.safetensors")
    hf = model.base_model.config.to_dict() | {"_ahn_implementation": impl, "sliding_window": 256}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    loaded = AHNModel.from_pretrained(load_base(model_dirs), tmp_path, window=8, sinks=2)
    assert loaded.ahn_config.memory == memory
    torch.testing.assert_close(logits(loaded, x), expected, rtol=0, atol=0)
    assert AHNModel.from_pretrained(load_base(model_dirs), tmp_path).ahn_config.window == 32640


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"window": 0}, "window=0 must be an int >= 1"),
        ({"sinks": -1}, "sinks=-1 must be an int >= 0"),
        ({"memory": "lstm"}, r"memory='lstm' is unknown; choose one of \('deltanet', 'gated_deltanet', 'gated_deltaproduct'"),
        ({"memory": "kda", "backend": "triton"}, "memory 'kda' has no Triton kernel of ahn's own"),
        ({"memory": "gdn2", "memory_kwargs": {"decay_rank": 0}}, "decay_rank=0 must be an int >= 1"),
        ({"memory": "gated_deltaproduct", "memory_kwargs": {"householder": "2"}}, "householder='2' must be an int >= 1"),
        ({"layers": [0, 0]}, "distinct non-negative"),
        ({"backend": "cuda"}, "backend='cuda' must be one of"),
        ({"memory_kwargs": {"state_size": 3}}, r"does not take options \['state_size'\]"),
    ],
)
def test_config_validation(model_dirs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ahn.add_memory(load_base(model_dirs), AHNConfig(**kwargs))


def test_layer_index_out_of_range(model_dirs):
    with pytest.raises(ValueError, match=r"layers \[5\] do not exist: the model has 2 layers"):
        ahn.add_memory(load_base(model_dirs), AHNConfig(layers=[0, 5]))


def test_unsupported_architectures_say_what_they_lack(model_dirs):
    from transformers import GPT2Config, GPT2LMHeadModel, Gemma2Config, Gemma2ForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=10, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match=r"decoder .* has no `\.layers`|lacks"):
        ahn.add_memory(gpt2, AHNConfig())
    with pytest.raises(ValueError, match="not a transformers PreTrainedModel"):
        ahn.add_memory(torch.nn.Linear(2, 2), AHNConfig())
    # Gemma 2 dispatches through the registry but soft-caps its attention logits, which ahn does not implement.
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    model = ahn.add_memory(gemma, AHNConfig(window=4, sinks=1))
    with pytest.raises(ValueError, match="uses softcap=, which ahn's sinks \\+ window attention does not implement"):
        logits(model, ids(1, 10))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_keeps_the_invariants(model_dirs, family, tmp_path):
    """Each tested family, through nothing but transformers' attention registry and hooks: short == base,
    parallel == prefill + decode with a bounded cache, padded rows == rows alone, save / load."""
    config = AHNConfig(memory="gated_deltanet", window=10, sinks=2, attention_block=7)
    short = ids(2, 12)
    ref = logits(load_base(model_dirs, family), short)
    model = ahn.add_memory(load_base(model_dirs, family), config)
    randomize_memory(model)
    torch.testing.assert_close(logits(model, short), ref, rtol=0, atol=ATOL)
    x = ids(2, 50, seed=3)
    parallel = logits(model, x)
    with model.attention_mode("window"):
        assert (parallel - logits(model, x)).abs().max() > 1e-3, "the memory must contribute"
    incremental, cache = run_incremental(model, x, [5, 13, 1])
    torch.testing.assert_close(incremental, parallel, rtol=0, atol=ATOL)
    assert cache.kv_length == 12
    long, short_row = ids(1, 25, seed=5)[0], ids(1, 17, seed=6)[0]
    batch = torch.stack([long, torch.cat([torch.zeros(8, dtype=torch.long), short_row])])
    mask = (batch != -1).long()
    mask[1, :8] = 0
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        both = model.generate(batch, attention_mask=mask, **gen)
        alone = [model.generate(r[None], attention_mask=torch.ones_like(r[None]), **gen)[0] for r in (long, short_row)]
    assert torch.equal(both[0], alone[0]) and torch.equal(both[1, 8:], alone[1])
    model.save_pretrained(tmp_path / "adapter")
    loaded = AHNModel.from_pretrained(load_base(model_dirs, family), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, x), parallel, rtol=0, atol=0)


def test_a_failed_load_leaves_the_base_model_as_it_was(model_dirs, tmp_path):
    """Loading a 2-layer adapter into a 3-layer model fails before anything is changed; the right one then loads."""
    model = ahn.add_memory(load_base(model_dirs), AHNConfig(window=8, sinks=2, layers=[0, 1]))
    model.save_pretrained(tmp_path / "two")
    three = tiny_model("qwen2", num_hidden_layers=3).eval()
    x = ids(1, 40)
    before = logits(three, x)
    impl = three.config._attn_implementation
    bad = AHNConfig(window=8, sinks=2).to_dict() | {"layers": None}
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ahn_config.json").write_text(json.dumps(bad))
    shutil.copy(tmp_path / "two" / "ahn_adapter.safetensors", tmp_path / "bad" / "ahn_adapter.safetensors")
    with pytest.raises(ValueError, match="lacks 1.* memory weights|lacks"):
        AHNModel.from_pretrained(three, tmp_path / "bad")
    torch.testing.assert_close(logits(three, x), before, rtol=0, atol=0)
    assert three.config._attn_implementation == impl and all(p.requires_grad for p in three.parameters())
    assert not any(".ahn." in n for n, _ in three.named_parameters())
    loaded = AHNModel.from_pretrained(three, tmp_path / "two")  # a retry with a matching adapter works
    assert {n.split(".")[2] for n, _ in loaded.named_memory_parameters()} == {"0", "1"}


def test_mode_change_before_a_checkpointed_backward_is_refused(model_dirs):
    model = ahn.add_memory(load_base(model_dirs), AHNConfig(window=8, sinks=2))
    randomize_memory(model)
    model.train()
    model.activation_checkpointing_enable()
    x = ids(1, 30)
    loss = model(x, labels=x, use_cache=False).loss
    with model.attention_mode("full"), pytest.raises(RuntimeError, match="attention mode changed"):
        loss.backward()


def test_bad_masks_and_caches(model_dirs):
    model = ahn.add_memory(load_base(model_dirs), AHNConfig(window=8, sinks=2))
    x = ids(1, 10)
    with pytest.raises(ValueError, match="left- or right-padded"):
        model(x, attention_mask=torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="already has an AHN memory"):
        ahn.add_memory(model, AHNConfig())
    with model.attention_mode("full"), pytest.raises(ValueError, match="cannot be used in attention_mode"):
        model(x, **cache_kwargs(model, AHNCache(2, 8, 2)))
    with pytest.raises(ValueError, match="mode='lstm' must be one of"):
        with model.attention_mode("lstm"):
            pass
    cache = model.new_cache()
    with torch.no_grad():
        model(ids(3, 10), **cache_kwargs(model, cache))
        with pytest.raises(ValueError, match="batch size changed: this AHNCache holds 3 sequences but the call has 1"):
            model(x, **cache_kwargs(model, cache))


def test_decode_writes_the_ring_buffer_in_place(model_dirs):
    model = ahn.add_memory(load_base(model_dirs), AHNConfig(window=8, sinks=2))
    x = ids(1, 40)
    cache = model.new_cache()
    with torch.no_grad():
        model(x[:, :20], **cache_kwargs(model, cache))  # the window is full from here on
        layer = cache.layers[0]
        storage = (layer.keys.data_ptr(), layer.values.data_ptr(), layer.gates.data_ptr())
        for t in range(20, 40):
            model(x[:, t : t + 1], **cache_kwargs(model, cache))
            assert (layer.keys.data_ptr(), layer.values.data_ptr(), layer.gates.data_ptr()) == storage


def test_gradient_checkpointing_gives_the_same_gradients(model_dirs):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same memory initialisation both times
        model = ahn.add_memory(load_base(model_dirs), AHNConfig(window=8, sinks=2))
        randomize_memory(model)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
        x = ids(2, 40)
        model(x, labels=x, use_cache=False).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_memory_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("memory", MEMORIES)
def test_bfloat16_model(model_dirs, memory):
    """A bf16 base: memory weights follow its dtype, the state accumulates in float32."""
    base = AutoModelForCausalLM.from_pretrained(model_dirs["qwen2"], dtype=torch.bfloat16).eval()
    model = ahn.add_memory(base, AHNConfig(memory=memory, window=6, sinks=2))
    assert all(p.dtype == torch.bfloat16 for p in model.memory_parameters())
    randomize_memory(model)
    x = ids(2, 30)
    parallel = logits(model, x).float()
    incremental, cache = run_incremental(model, x, [20])
    assert cache.layers[0].memory_state.dtype == torch.float32
    torch.testing.assert_close(incremental.float(), parallel, rtol=0, atol=LOGITS_ATOL[torch.bfloat16])
    loss = model(x, labels=x, use_cache=False).loss
    loss.backward()
    assert all(p.grad is not None for p in model.memory_parameters())


def test_generate_explains_a_mask_inferred_from_pad_tokens(model_dirs):
    model = ahn.add_memory(load_base(model_dirs), AHNConfig(window=6, sinks=2))
    x = ids(1, 20)
    x[0, 10] = 0
    with pytest.raises(ValueError, match="pass attention_mask explicitly"):
        model.generate(x, max_new_tokens=2, pad_token_id=0)
    assert model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=2, pad_token_id=0).shape == (1, 22)


def test_decoding_without_grad_then_training_on_the_same_cache(model_dirs):
    """No-grad decoding runs the memory in inference mode; a later forward with autograd on the same
    cache still trains (the cached state is copied out of inference mode) and computes the same."""
    model = ahn.add_memory(load_base(model_dirs), AHNConfig(memory="gated_deltanet", window=6, sinks=2))
    randomize_memory(model)
    x = ids(1, 40, seed=5)
    cache = model.new_cache()
    with torch.no_grad():
        model(x[:, :20], **cache_kwargs(model, cache), use_cache=True)
        for i in range(20, 24):
            model(x[:, i : i + 1], **cache_kwargs(model, cache), use_cache=True)
    assert cache.layers[0].memory_state.is_inference()
    for step in (x[:, 24:25], x[:, 24:40]):  # a decode step, and a chunk longer than the window
        with torch.no_grad():
            expected = model(step, **cache_kwargs(model, copy.deepcopy(cache)), use_cache=True).logits
        branch = copy.copy(cache)  # a shallow copy keeps the layers' (inference) state tensors
        branch.layers = [copy.copy(layer) for layer in cache.layers]
        for layer in branch.layers:
            layer.keys, layer.values, layer.gates = layer.keys.clone(), layer.values.clone(), layer.gates.clone()
        assert branch.layers[0].memory_state.is_inference()
        out = model(step, **cache_kwargs(model, branch), use_cache=True).logits
        torch.testing.assert_close(out.detach(), expected, rtol=0, atol=ATOL)
        model.zero_grad()
        out.sum().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.memory_parameters())


def test_remove_memory_leaves_the_base_model_as_it_was_loaded(model_dirs):
    """Issue 23.9: add_memory, run, remove_memory: the base model computes, names, hooks and trains as before."""
    base = load_base(model_dirs)
    base.lm_head.weight.requires_grad_(False)  # a user's own freezing survives the round trip
    x = ids(2, 40)
    before = logits(base, x)
    grads = {n: p.requires_grad for n, p in base.named_parameters()}
    names, impl = list(base.state_dict()), base.config._attn_implementation
    model = ahn.add_memory(base, AHNConfig(window=8, sinks=2, buffer_slots=2, readout="defer"))
    randomize_memory(model)
    assert not torch.equal(logits(model, x), before)
    assert model.remove_memory() is base
    assert torch.equal(logits(base, x), before)
    assert list(base.state_dict()) == names and base.config._attn_implementation == impl
    assert {n: p.requires_grad for n, p in base.named_parameters()} == grads
    hooks = [m for m in base.modules() if m._forward_pre_hooks or m._forward_hooks]
    assert not hooks and not hasattr(base, "_ahn_runtime")
    with pytest.raises(RuntimeError, match="memory was removed"):
        model(x)
    with ahn.add_memory(base, AHNConfig(window=8, sinks=2)) as again:  # attachable again; detached on leaving
        assert again(x).logits.shape == before.shape
    assert torch.equal(logits(base, x), before) and not hasattr(base, "_ahn_runtime")


def test_a_pipeline_takes_the_model_quietly(model_dirs, caplog):
    """transformers.pipeline("text-generation") with an AHNModel logs no error-level "not supported"."""
    import logging

    from transformers import pipeline
    from transformers.utils import logging as hf_logging

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz "
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE({c: i for i, c in enumerate(letters)},
                                                                              merges=[])), eos_token="z")
    model = ahn.add_memory(load_base(model_dirs), AHNConfig(window=8, sinks=2))
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    finally:
        hf_logging.disable_propagation()
    assert pipe.model is model
    out = pipe("a long text " * 3, max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert out.startswith("a long text ") and len(out) > len("a long text " * 3)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def test_add_memory_leaves_a_model_sharing_its_config_alone():
    """Issue 25.21: two models built from one config object; attaching a memory to one changes nothing in the other."""
    cfg = tiny_config("qwen2")
    torch.manual_seed(0)
    a, b = AutoModelForCausalLM.from_config(cfg).eval(), AutoModelForCausalLM.from_config(cfg).eval()
    x = ids(1, 30)
    before = logits(b, x)
    model = ahn.add_memory(a, AHNConfig(window=8, sinks=2))
    assert torch.equal(logits(b, x), before)  # b still runs its own attention
    other = ahn.add_memory(b, AHNConfig(window=8, sinks=2))
    with other.attention_mode("full"):  # b's own implementation was recorded as it was, not as ahn's
        assert torch.equal(logits(other, x), before)
    assert model.remove_memory().config is cfg and other.remove_memory().config is cfg
