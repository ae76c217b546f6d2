"""Adapter files: an overwrite killed at any step leaves the old adapter or the new one, whole."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ahn import AHNConfig
from ahn.adapters import CONFIG_NAME, WEIGHTS_NAME, read_adapter, save_adapter


def fake_model(config: AHNConfig, seed: int):
    """What save_adapter reads of a model: its config and memory weights."""
    gen = torch.Generator().manual_seed(seed)
    state = {f"model.layers.{i}.self_attn.ahn.o_proj.weight": torch.randn(4, 8, 8, generator=gen) for i in range(2)}
    return SimpleNamespace(ahn_config=config, memory_state_dict=lambda: state), state


OLD = fake_model(AHNConfig(window=8, sinks=2), seed=0)
NEW = fake_model(AHNConfig(window=12, sinks=3, memory="deltanet"), seed=1)

# Every file-system change save_adapter can make; the child dies just before the k-th (or half-way through a write).
MUTATIONS = [(os, "replace"), (os, "rename"), (os, "remove"), (os, "unlink"), (os, "chmod"), (shutil, "rmtree"),
             (Path, "write_bytes"), (Path, "write_text"), (Path, "mkdir")]


def _save_and_die_at(k: int, path: str) -> None:
    count = [0]

    def patch(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            count[0] += 1
            if count[0] == k:
                if name in ("write_bytes", "write_text"):  # a torn write: half the data, then death
                    data = args[1]
                    original(args[0], data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    for owner, name in MUTATIONS:
        patch(owner, name)
    save_adapter(NEW[0], path)
    os._exit(0)


def assert_whole(path, expected):
    config, state = read_adapter(path)
    assert config == expected[0].ahn_config
    assert state.keys() == expected[1].keys() and all(torch.equal(state[n], expected[1][n]) for n in state)


@pytest.mark.parametrize("fresh", [False, True], ids=["overwrite", "new-directory"])
def test_an_adapter_write_killed_at_any_step_leaves_one_whole_adapter(tmp_path, fresh):
    path = tmp_path / "adapter"
    ctx = multiprocessing.get_context("fork")
    outcomes = []
    for k in range(1, 50):
        if path.exists():
            shutil.rmtree(path)
        if not fresh:
            save_adapter(OLD[0], path)
        child = ctx.Process(target=_save_and_die_at, args=(k, str(path)))
        child.start()
        child.join()
        killed = child.exitcode == -signal.SIGKILL
        if fresh and not path.exists():
            outcomes.append("none")  # a new adapter appears whole or not at all
        else:
            try:
                assert_whole(path, OLD)
                outcomes.append("old")
            except AssertionError:
                assert_whole(path, NEW)
                outcomes.append("new")
        if not killed:
            assert child.exitcode == 0 and outcomes[-1] == "new"
            break
    else:
        pytest.fail("the save never completed")
    assert "new" in outcomes[:-1] or fresh, f"some kill must land after the commit point: {outcomes}"
    # The next save removes what the killed writers left behind.
    save_adapter(NEW[0], path)
    leftovers = [p.name for p in [*tmp_path.iterdir(), *path.iterdir()] if ".tmp-" in p.name]
    assert leftovers == []
    assert sorted(os.listdir(path)) == [WEIGHTS_NAME, CONFIG_NAME]


def test_a_config_edited_by_hand_is_used(tmp_path):
    save_adapter(OLD[0], tmp_path / "a")
    d = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    d["window"] = 100
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(d))
    assert read_adapter(tmp_path / "a")[0].window == 100
    del d["weights_sha256"]  # a config written by hand or by an older ahn
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(d))
    assert read_adapter(tmp_path / "a")[0].window == 100


def test_adapter_files_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_adapter(OLD[0], tmp_path / "a")
        save_adapter(OLD[0], tmp_path / "a")  # the overwrite path too
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        assert stat.S_IMODE((tmp_path / "a" / name).stat().st_mode) == 0o644


def test_a_truncated_weights_file_names_the_file(tmp_path):
    save_adapter(OLD[0], tmp_path / "a")
    w = tmp_path / "a" / WEIGHTS_NAME
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{w}.* the adapter is damaged"):
        read_adapter(tmp_path / "a")


def test_saving_the_same_adapter_twice_gives_the_same_bytes(tmp_path):
    """Issue 25.19: the weights file's metadata is written in a fixed order, so an identical re-save is byte-identical
    (ahn eval's adapter_sha256 then lets a run resume)."""
    files = []
    for i in range(8):
        save_adapter(OLD[0], tmp_path / str(i))
        files.append(((tmp_path / str(i) / WEIGHTS_NAME).read_bytes(), (tmp_path / str(i) / CONFIG_NAME).read_bytes()))
    assert all(f == files[0] for f in files)
