"""Saved reading states (ahn.state): read, save, load and continue == one continuous read, bit for bit;
a state's size does not grow with the text; a state never loads into another model, adapter, config or mode;
damaged files are named."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import ahn
from ahn import AHNCache, AHNConfig
from ahn.generate import read
from ahn.model import cache_kwargs, output_cache
from helpers import assert_same_cache, ids, load_base, randomize_memory, randomize_salience, tiny_model

W, S, CHUNK = 16, 3, 16
CONFIGS = {
    "gated_deltanet": dict(memory="gated_deltanet"),
    "gated_deltanet-salience": dict(memory="gated_deltanet", buffer_slots=3, salience_writes=True, readout="defer"),
    "deltanet": dict(memory="deltanet"),
    "mamba2-salience": dict(memory="mamba2", buffer_slots=2, salience_writes=True),
    "kda": dict(memory="kda"),  # a multi-channel gate code in the cache (torch-op decode)
    "gated_deltaproduct-salience": dict(memory="gated_deltaproduct", buffer_slots=2, salience_writes=True),
}


def make_model(model_dirs, family="qwen2", seed=0, **config):
    model = ahn.add_memory(load_base(model_dirs, family), AHNConfig(window=W, sinks=S, **config))
    randomize_memory(model, seed)
    randomize_salience(model, seed)
    return model


def decode(model, cache, tokens) -> torch.Tensor:
    """Logits ``[1, n, vocab]`` of feeding ``tokens [1, n]`` one at a time (the decode path)."""
    with torch.no_grad():
        return torch.cat([model(tokens[:, i: i + 1], **cache_kwargs(model, cache), use_cache=True).logits
                          for i in range(tokens.shape[1])], 1)


@pytest.mark.parametrize("name, mode", [(name, "ahn") for name in CONFIGS] + [("gated_deltanet-salience", "window")])
def test_read_save_load_continue_equals_one_read(model_dirs, tmp_path, name, mode):
    """Read A (uneven chunks), save, load, read B, decode 4 tokens, save, load, decode 4 more: the same floats as
    doing it all in one cache, at every step (the saved state is exactly what the continuation needs)."""
    model = make_model(model_dirs, **CONFIGS[name])
    a, b, tail = ids(1, 45, seed=1)[0].tolist(), ids(1, 37, seed=2)[0].tolist(), ids(1, 8, seed=3)
    path = tmp_path / "s.state"
    with model.attention_mode(mode):
        one = model.new_cache()
        read(model, [a], one, CHUNK)
        one_b = read(model, [b], one, CHUNK)
        one_decoded = decode(model, one, tail)

        saved = model.new_cache()
        read(model, [a], saved, CHUNK)
        saved.save(path)
        loaded = AHNCache.load(path, model)
        assert_same_cache(loaded, saved)
        loaded_b = read(model, [b], loaded, CHUNK)
        first = decode(model, loaded, tail[:, :4])
        loaded.save(path)  # mid-generation: the ring has wrapped, the state was made in inference mode
        again = AHNCache.load(path, model)
        second = decode(model, again, tail[:, 4:])
    assert torch.equal(loaded_b, one_b)
    assert torch.equal(torch.cat([first, second], 1), one_decoded)
    assert_same_cache(again, one)


def test_one_read_with_the_same_chunk_boundaries_equals_a_continued_read(model_dirs, tmp_path):
    """When len(A) is a multiple of the chunk, one read of A + B makes the same forward calls as A, then B."""
    model = make_model(model_dirs, **CONFIGS["gated_deltanet-salience"])
    x = ids(1, 3 * CHUNK + 21, seed=4)[0].tolist()
    whole = model.new_cache()
    whole_logits = read(model, [x[:20], x[20:]], whole, CHUNK)  # pieces of any size: chunks count from the start
    part = model.new_cache()
    read(model, [x[: 3 * CHUNK]], part, CHUNK)
    part.save(tmp_path / "s.state")
    continued = AHNCache.load(tmp_path / "s.state", model)
    assert torch.equal(read(model, [x[3 * CHUNK:]], continued, CHUNK), whole_logits)
    assert_same_cache(continued, whole)


def tiniest_model(**config):
    torch.manual_seed(0)
    base = tiny_model(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=False)
    return ahn.add_memory(base.eval(), AHNConfig(window=16, sinks=2, **config))


def state_size_after(model, n: int, path, chunk: int = 16384) -> int:
    gen = torch.Generator().manual_seed(0)
    cache = model.new_cache()
    read(model, (torch.randint(0, 97, (min(chunk, n - a),), generator=gen).tolist() for a in range(0, n, chunk)),
         cache, chunk)
    cache.save(path)
    assert AHNCache.load(path, model).get_seq_length() == n
    return os.path.getsize(path)


@pytest.mark.parametrize("options, long", [
    (dict(attention_block=128), 100_000),
    # The salience path's prefill blocks of 64 queries cost more per token: 10k tokens keep the test fast,
    # and the buffer's M slots are allocated at the first forward, never grown.
    (dict(buffer_slots=4, salience_writes=True, readout="defer", attention_block=64), 10_000),
])
def test_state_size_does_not_grow_with_the_text(tmp_path, options, long):
    model = tiniest_model(**options)
    assert state_size_after(model, 1000, tmp_path / "short.state") == state_size_after(model, long, tmp_path / "long")


@pytest.fixture
def state(model_dirs, tmp_path):
    """(model, path of a state it saved after 40 tokens)."""
    model = make_model(model_dirs, **CONFIGS["gated_deltanet"])
    cache = model.new_cache()
    read(model, [ids(1, 40)[0].tolist()], cache, CHUNK)
    cache.save(tmp_path / "s.state")
    return model, tmp_path / "s.state"


def test_a_state_loads_only_into_its_model_adapter_config_and_mode(model_dirs, state):
    model, path = state
    other_weights = AutoModelForCausalLM.from_config(load_base(model_dirs).config)  # same architecture, new init
    fresh_memory = ahn.add_memory(load_base(model_dirs), AHNConfig(window=W, sinks=S))
    for other, message in [
        (ahn.add_memory(other_weights.eval(), AHNConfig(window=W, sinks=S)), "a model of this architecture but other weights"),
        (make_model(model_dirs, family="qwen3"), "another base model"),
        (make_model(model_dirs, seed=1), "other memory weights than this model's"),
        (fresh_memory, "other memory weights than this model's"),
        (ahn.add_memory(load_base(model_dirs), AHNConfig(window=8, sinks=S)), "window=16 (this model: 8)"),
        (make_model(model_dirs, memory="deltanet"), "memory='gated_deltanet' (this model: 'deltanet')"),
        (make_model(model_dirs, buffer_slots=2), "buffer_slots=0 (this model: 2)"),
    ]:
        with pytest.raises(ValueError, match=f"{re.escape(str(path))}.*{re.escape(message)}"):
            AHNCache.load(path, other)
    with model.attention_mode("window"), pytest.raises(ValueError, match="saved in attention mode 'ahn' but the model "
                                                                         "is in 'window'"):
        AHNCache.load(path, model)
    # How the same function is computed is not part of what a state means.
    compute = ahn.add_memory(load_base(model_dirs), AHNConfig(window=W, sinks=S, backend="recurrent",
                                                              attention_block=7))
    compute.load_state_dict(model.state_dict())
    assert AHNCache.load(path, compute).get_seq_length() == 40


def _rewrite(path, out, tensors=None, meta=None, fix_checksums=False):
    """Write a copy of the state at ``path`` to ``out`` with ``tensors`` / ``meta`` changed (the checksums recomputed
    only with ``fix_checksums``: a file rewritten by other code, not damaged in transit)."""
    import ahn.state

    with safe_open(str(path), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
        old = json.loads(f.metadata()["ahn_state"])
    stored = tensors(stored) if tensors is not None else stored
    new = meta(old) if meta is not None else old
    if fix_checksums:
        new["sha256"] = {k: ahn.state._checksum(v) for k, v in stored.items()}
    save_file(stored, str(out), metadata={"ahn_state": json.dumps(new)})
    return out


def test_damaged_or_foreign_state_files_are_named(state, tmp_path):
    model, path = state
    good = path.read_bytes()
    header = json.loads(good[8: 8 + int.from_bytes(good[:8], "little")])
    meta = json.loads(header["__metadata__"]["ahn_state"])
    cases = {
        "truncated": (good[:-50], "is not a readable state file"),
        "garbage": (b"not a state at all" * 10, "is not a readable state file"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name} {message}")):
            AHNCache.load(tmp_path / name, model)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain"))
    future = dict(meta, format="ahn-state/9")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "future"), metadata={"ahn_state": json.dumps(future)})
    save_file({"x": torch.zeros(2)}, str(tmp_path / "hollow"), metadata={"ahn_state": json.dumps(meta)})
    for name, message in [
        ("plain", "is a safetensors file but not an ahn state"),
        ("future", "has state format 'ahn-state/9'; this ahn reads 'ahn-state/2' and 'ahn-state/1'"),
        ("hollow", "its tensors (1) and its checksums"),
        ("missing", "does not exist"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            AHNCache.load(tmp_path / name, model)


def _scaled(key, factor):
    return lambda t: {k: (v * factor if k == key else v) for k, v in t.items()}


@pytest.mark.parametrize("name, tensors, meta, fix, message", [
    # Values changed after saving: the integrity check names the tensor.
    ("memory x1.5", _scaled("layers.0.memory_state", 1.5), None, False, "'layers.0.memory_state' fails its integrity"),
    ("memory NaN", _scaled("layers.1.memory_state", float("nan")), None, False, "'layers.1.memory_state' fails"),
    ("keys changed", _scaled("layers.0.keys", 2.0), None, False, "'layers.0.keys' fails its integrity check"),
    ("seen +1000 everywhere", lambda t: {k: (v + 1000 if k.endswith(".seen") else v) for k, v in t.items()}, None,
     False, "'layers.0.seen' fails its integrity check"),
    ("a tensor removed", lambda t: {k: v for k, v in t.items() if k != "layers.0.gates"}, None, False,
     "its tensors (10) and its checksums (11) disagree (['layers.0.gates'])"),
    # Rewritten by other code with fresh checksums: the contents are checked against the model.
    ("one layer's seen", lambda t: dict(t, **{"layers.1.seen": torch.tensor(41)}), None, True,
     "the layers disagree on the tokens read"),
    ("wrong dtype", lambda t: dict(t, **{"layers.0.keys": t["layers.0.keys"].double()}), None, True,
     "layer 0 keys (1, 2, 19, 12) torch.float64 do not fit [batch 1, 2 kv heads, 3 sinks + 0 buffer + ring of 16"),
    ("wrong shape", lambda t: dict(t, **{"layers.1.gates": t["layers.1.gates"][:, :3]}), None, True,
     "layer 1 gates is (1, 3, 4, 2), expected (1, 16, 4, 2)"),
    ("a state without its gates", lambda t: {k: v for k, v in t.items() if k != "layers.0.gates"}, None, True,
     "layer 0 gates is None, expected"),
    ("NaN state, resummed", _scaled("layers.0.memory_state", float("nan")), None, True, "is not a finite"),
    ("pads", lambda t: dict(t, pad_offsets=torch.tensor([99])), None, True, "pad_offsets (1,) torch.int64 is not"),
    # The header: every field is needed and checked.
    ("header lacks the window", None, lambda m: dict(m, cache={k: v for k, v in m["cache"].items() if k != "window"}),
     False, "the state's header is incomplete or malformed"),
    ("header lacks the checksums", None, lambda m: {k: v for k, v in m.items() if k != "sha256"}, False,
     "the state's metadata lacks sha256"),
    ("header's buffer slots", None, lambda m: dict(m, cache=dict(m["cache"], buffer_slots=[2, 2])), False,
     "holds buffer slots [2, 2] per layer but the model's configuration gives [0, 0]"),
    ("header's layers", None, lambda m: dict(m, cache=dict(m["cache"], layers=3)), False,
     "holds 3 layers but the model has 2"),
    # Issue 25.16: the window and sinks of the header are checked against what the file holds.
    ("header's window", None, lambda m: dict(m, cache=dict(m["cache"], window=8)), False,
     "layer 0 keys (1, 2, 19, 12) torch.float32 do not fit [batch 1, 2 kv heads, 3 sinks + 0 buffer + ring of 8 to 8"),
    ("header's sinks", None, lambda m: dict(m, cache=dict(m["cache"], sinks=5)), False,
     "layer 0 keys (1, 2, 19, 12) torch.float32 do not fit [batch 1, 2 kv heads, 5 sinks"),
])
def test_a_state_changed_after_saving_is_refused(state, tmp_path, name, tensors, meta, fix, message):
    """Issue 25.4: contents changed after saving (values, positions, shapes, dtypes, header fields) are refused at load
    with the file's name, never loaded into wrong logits or a crash at the first forward."""
    model, path = state
    bad = _rewrite(path, tmp_path / "bad.state", tensors, meta, fix)
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ".*" + re.escape(message)):
        AHNCache.load(bad, model)


def test_a_state_of_the_format_before_the_schema_still_loads(model_dirs, tmp_path):
    """ahn-state/1 files (every cache-layer attribute under its attribute name, no checksums) load, with a warning,
    and continue exactly as the cache they were saved from."""
    model = make_model(model_dirs, **CONFIGS["gated_deltanet-salience"])
    cache = model.new_cache()
    read(model, [ids(1, 45, seed=1)[0].tolist()], cache, CHUNK)
    cache.save(tmp_path / "v2.state")
    v1_names = {"salience_token": "sal_token", "salience_mass": "sal_mass", "buffer_slot": "buf_slot",
                "buffer_score": "buf_score"}

    def to_v1(meta):
        layers = []
        for i in range(meta["cache"]["layers"]):
            kinds = {"window": "int", "sinks": "int", "buffer_slots": "int", "ring_start": "int", "seen": "int",
                     "is_initialized": "bool", "dtype": "dtype:float32", "device": "device"}
            for field in ahn.state.LAYER_FIELDS:
                kinds[v1_names.get(field, field)] = "tensor" if f"layers.{i}.{field}" in meta["sha256"] else "none"
            layers.append(kinds)
        c = meta["cache"]
        return {"format": "ahn-state/1", "ahn_version": "0.1.0",
                "fingerprint": dict(meta["fingerprint"], ahn_config=dict(meta["fingerprint"]["ahn_config"])),
                "cache": {"window": c["window"], "sinks": c["sinks"], "mode": c["mode"], "buffers": c["buffer_slots"],
                          "pad_offsets": True}, "layers": layers}

    def tensors_v1(t):
        out = {}
        for k, v in t.items():
            parts = k.split(".")
            if parts[0] == "layers":
                parts[2] = v1_names.get(parts[2], parts[2])
            out[".".join(parts)] = v
        for i in range(2):
            out |= {f"layers.{i}.{n}": torch.tensor(x) for n, x in
                    (("window", W), ("sinks", S), ("buffer_slots", 3), ("ring_start", S + 3), ("is_initialized", True))}
        return out

    import ahn.state

    old = _rewrite(tmp_path / "v2.state", tmp_path / "v1.state", tensors_v1, to_v1)
    with pytest.warns(FutureWarning, match="format 'ahn-state/1'"):
        loaded = AHNCache.load(old, model)
    assert_same_cache(loaded, cache)
    tail = ids(1, 5, seed=7)
    assert torch.equal(decode(model, loaded, tail), decode(model, cache, tail))


def test_save_needs_its_model_writes_atomically_and_refuses_what_it_cannot_hold(model_dirs, tmp_path, monkeypatch):
    model = make_model(model_dirs)
    with torch.no_grad():
        cache = output_cache(model(ids(1, 30), use_cache=True))  # made inside the forward, not by new_cache()
    with pytest.raises(ValueError, match=r"does not know its model .* call cache.save\(path, model\)"):
        cache.save(tmp_path / "s.state")
    cache.save(tmp_path / "s.state", model)
    assert AHNCache.load(tmp_path / "s.state", model).get_seq_length() == 30
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "s.state").stat().st_mode) == 0o666 & ~umask  # as any file the user writes
    with pytest.raises(ValueError, match="the folder .* does not exist"):
        cache.save(tmp_path / "nowhere" / "s.state", model)

    import ahn.state

    def killed(tensors, filename, metadata):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    before = (tmp_path / "s.state").read_bytes()
    monkeypatch.setattr(ahn.state, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        cache.save(tmp_path / "s.state", model)
    assert (tmp_path / "s.state").read_bytes() == before and os.listdir(tmp_path) == ["s.state"]
    monkeypatch.undo()

    # The file holds the schema's fields, not the layer's attributes: one added to a layer changes nothing.
    cache.layers[0].notes = ["a list"]
    cache.save(tmp_path / "t.state", model)
    assert (tmp_path / "t.state").read_bytes() == (tmp_path / "s.state").read_bytes()


def test_save_refuses_another_models_fingerprint(model_dirs, tmp_path):
    """Issue 25.5: a cache filled by one model cannot be saved under another model's fingerprint."""
    model, other = make_model(model_dirs), make_model(model_dirs, seed=1)
    cache = model.new_cache()
    read(model, [ids(1, 30)[0].tolist()], cache, CHUNK)
    with pytest.raises(ValueError, match="this cache was filled by another model"):
        cache.save(tmp_path / "s.state", model=other)
    assert not (tmp_path / "s.state").exists()
    cache.save(tmp_path / "s.state", model=model)  # its own model, named: fine
    with pytest.raises(ValueError, match="other memory weights"):
        AHNCache.load(tmp_path / "s.state", other)


def test_save_through_a_symlink_writes_its_target(model_dirs, tmp_path):
    """Issue 25.6: saving to a symlink replaces the file it points to (the link stays a link); a path that is
    not a regular file (a device, a pipe) is refused before anything is written."""
    model = make_model(model_dirs)
    cache = model.new_cache()
    read(model, [ids(1, 30)[0].tolist()], cache, CHUNK)
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "book.state"
    cache.save(target)
    stale = target.read_bytes()
    read(model, [ids(1, 9, seed=5)[0].tolist()], cache, CHUNK)
    link = tmp_path / "link.state"
    link.symlink_to(target)
    cache.save(link)
    assert link.is_symlink() and target.read_bytes() != stale
    assert AHNCache.load(link, model).get_seq_length() == 39
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ValueError, match="is not a regular file"):
        cache.save(tmp_path / "pipe")
    assert stat.S_ISFIFO(os.stat(tmp_path / "pipe").st_mode)
    with pytest.raises(ValueError, match="is not a regular file"):
        cache.save("/dev/null")


def test_a_state_continued_in_another_dtype_says_so(model_dirs, state):
    """Issue 25.12: a state saved in float32 and loaded into a bfloat16 model names the dtypes and the flag."""
    _, path = state
    model = make_model(model_dirs).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"saved with the model in float32, but this model is in bfloat16: load it in "
                                         r"float32 \(ahn generate: --dtype float32\)"):
        AHNCache.load(path, model)
