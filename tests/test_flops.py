"""`ahn flops`: the analytic count against torch's FlopCounterMode and the real cache bytes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import Qwen2ForCausalLM

import ahn
from ahn.model import cache_kwargs, output_cache
from ahn.flops import ModelShape, compare, count, measured_flops
from helpers import tiny_qwen2_config

W, S, T = 48, 8, 300


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = tiny_qwen2_config(vocab_size=500, hidden_size=64, intermediate_size=128, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    return ahn.add_memory(Qwen2ForCausalLM(config).eval(), ahn.AHNConfig(window=W, sinks=S))


def measure(model, mode, x):
    with model.attention_mode(mode), torch.no_grad():
        return measured_flops(lambda: model(x, use_cache=False))


def test_analytic_flops_match_flop_counter(model):
    """Exact for full attention and sinks + window (causal / windowed pairs, projections, MLP, LM head).

    The memory term counts the recurrent form (write, read, output projection, gates); the
    chunkwise torch kernel that runs prefill on CPU does more work (C x C in-chunk products),
    so for "ahn" only the non-memory part is exact and the measured memory cost is at least
    the analytic one.
    """
    shape = ModelShape.from_config(model.config)
    x = torch.randint(0, 500, (1, T))
    for mode in ("full", "window"):
        assert measure(model, mode, x) == count(shape, T, mode, window=W, sinks=S)["flops"], mode
    ahn_count = count(shape, T, "ahn", window=W, sinks=S)
    measured_memory = measure(model, "ahn", x) - measure(model, "window", x)
    assert ahn_count["flops"] - ahn_count["flops_breakdown"]["memory"] == count(shape, T, "window", window=W, sinks=S)["flops"]
    assert ahn_count["flops_breakdown"]["memory"] <= measured_memory <= 6 * ahn_count["flops_breakdown"]["memory"]


@pytest.mark.parametrize("n", [30, T])  # before and after the window fills
def test_analytic_cache_bytes_equal_the_real_caches(model, n):
    shape = ModelShape.from_config(model.config)
    x = torch.randint(0, 500, (1, n))
    for mode in ("window", "ahn"):
        with model.attention_mode(mode), torch.no_grad():
            cache = model.new_cache()
            model(x, **cache_kwargs(model, cache))
        assert cache.nbytes == count(shape, n, mode, window=W, sinks=S, dtype="float32")["cache_bytes"], mode
    with model.attention_mode("full"), torch.no_grad():
        cache = output_cache(model(x, use_cache=True))
    full_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert full_bytes == count(shape, n, "full", dtype="float32")["cache_bytes"]


@pytest.mark.parametrize("n", [30, T])
def test_cache_bytes_with_a_priority_buffer(n):
    torch.manual_seed(0)
    config = tiny_qwen2_config(vocab_size=500, hidden_size=64, intermediate_size=128, tie_word_embeddings=False)
    options = dict(buffer_slots=5, salience_writes=True, readout="defer")
    model = ahn.add_memory(Qwen2ForCausalLM(config).eval(), ahn.AHNConfig(window=W, sinks=S, layers=[1], **options))
    with torch.no_grad():
        cache = model.new_cache()
        model(torch.randint(0, 500, (1, n)), **cache_kwargs(model, cache))
    shape = ModelShape.from_config(config)
    assert cache.nbytes == count(shape, n, "ahn", window=W, sinks=S, dtype="float32", memory_layers=1,
                                 **options)["cache_bytes"]
    assert cache.kv_length == S + 5 + min(W, n)


@pytest.mark.parametrize("memory, options", [(m, {}) for m in ahn.available_memories()]
                         + [("kda", {"decay_rank": 3}), ("gated_deltaproduct", {"householder": 3})])
def test_every_rule_declares_its_cache_and_update(memory, options):
    """Each rule's MemoryCost: its cached gates equal the real cache's, byte for byte (options included), and the
    memory FLOPs grow with the declared update."""
    torch.manual_seed(0)
    config = tiny_qwen2_config(vocab_size=500, hidden_size=64, intermediate_size=128, tie_word_embeddings=False)
    model = ahn.add_memory(Qwen2ForCausalLM(config).eval(),
                           ahn.AHNConfig(memory=memory, memory_kwargs=options, window=W, sinks=S))
    with torch.no_grad():
        cache = model.new_cache()
        model(torch.randint(0, 500, (1, T)), **cache_kwargs(model, cache))
    shape = ModelShape.from_config(config)
    counted = count(shape, T, "ahn", window=W, sinks=S, dtype="float32", memory=memory, memory_kwargs=options)
    assert cache.nbytes == counted["cache_bytes"]
    plain = count(shape, T, "ahn", window=W, sinks=S, memory="gated_deltanet")["flops_breakdown"]["memory"]
    assert (counted["flops_breakdown"]["memory"] > plain) == (memory in ("kda", "gdn2", "gated_deltaproduct"))
    with pytest.raises(ValueError, match=f"memory '{memory}' does not take options \\['nope'\\]"):
        count(shape, T, "ahn", memory=memory, memory_kwargs={"nope": 1})


def test_buffer_flops():
    shape = ModelShape(2048, 36, 16, 2, 128, 11008, 151936)  # Qwen2.5-3B-Instruct
    plain = count(shape, 65536, "ahn", window=8192, sinks=64)
    buffered = count(shape, 65536, "ahn", window=8192, sinks=64, buffer_slots=32, salience_writes=True, readout="defer")
    extra = buffered["flops"] - plain["flops"]
    evicted = 65536 - 8192 - 64
    buffer_attention = 36 * 4 * 16 * 128 * (32 * 33 // 2 + (evicted - 32) * 32)
    projections = 36 * 2 * 65536 * 2048 * (2 + 16)
    assert extra == buffer_attention + projections
    assert extra < 0.01 * plain["flops"]  # 32 slots beside an 8192-token window


def test_savings_grow_with_length():
    shape = ModelShape(2048, 36, 16, 2, 128, 11008, 151936)  # Qwen2.5-3B-Instruct
    short, long = (compare(shape, n, window=32640, sinks=128) for n in (32768, 131072))
    assert short["ahn"]["flops_saving_pct"] < 1 and long["ahn"]["flops_saving_pct"] > 40
    assert long["ahn"]["cache_saving_pct"] > 70
    assert long["window"]["flops"] < long["ahn"]["flops"] < long["full"]["flops"]


def test_cli_json_and_plot(tmp_path):
    cfg = tiny_qwen2_config(vocab_size=1000, hidden_size=64, intermediate_size=128, tie_word_embeddings=False)
    cfg.save_pretrained(tmp_path)
    png = tmp_path / "flops.png"
    out = subprocess.run(
        [sys.executable, "-m", "ahn", "flops", "--model", str(tmp_path / "config.json"), "--seq-len", "4096",
         "--window", "1024", "--sinks", "64", "--json", "--plot", str(png)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout[: out.stdout.rindex("}") + 1])
    assert set(data) == {"full", "window", "ahn"}
    assert data["full"]["flops"] > data["ahn"]["flops"] > data["window"]["flops"]
    assert png.stat().st_size > 0
    bad = subprocess.run([sys.executable, "-m", "ahn", "flops", "--model", str(tmp_path / "config.json"), "--seq-len", "8",
                          "--memory", "lstm"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "memory='lstm' is unknown; choose one of" in bad.stderr


def test_shipped_model_configs_load():
    """The configs under ahn/configs/models/ load offline; the paper's Qwen2.5-3B numbers follow from them."""
    from ahn.configs import load_model_config, shipped_models

    assert "Qwen2.5-3B-Instruct" in shipped_models()
    for name in shipped_models():
        shape = ModelShape.from_config(load_model_config(name))
        assert shape.num_layers > 0 and shape.head_dim > 0, name
    assert ModelShape.from_config(load_model_config("Qwen/Qwen2.5-3B-Instruct")) == ModelShape(
        hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=2, head_dim=128, intermediate_size=11008,
        vocab_size=151936,
    )


def test_plot_message_names_the_file_written(tmp_path, capsys, monkeypatch):
    """Item 17 of issue 25: ``--plot myplot`` wrote myplot.png (matplotlib's default format) but printed "myplot"."""
    from ahn.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["flops", "--model", "Qwen2.5-0.5B-Instruct", "--seq-len", "64", "--window", "16", "--sinks", "4",
                 "--readout", "add", "--json", "--plot", "myplot"]) == 0
    assert "plot written to myplot.png" in capsys.readouterr().out
    assert (tmp_path / "myplot.png").stat().st_size > 0 and not (tmp_path / "myplot").exists()
