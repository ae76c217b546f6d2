"""lm-evaluation-harness integration (ahn.lm_eval), offline, on the tiny random Qwen2 of the byte_lm fixture.

"full" must be lm-eval's plain HFLM on the bare base model, request by request and metric by
metric; "window" / "ahn" must run every request type with ahn's bounded cache and differ from
"full" once a document is longer than sinks + window.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import ahn  # noqa: E402
from ahn.lm_eval import TASKS_DIR, UNBOUNDED, AHNLM  # noqa: E402
from ahn.model import output_cache  # noqa: E402
from helpers import BYTE_LM_SINKS as SINKS, BYTE_LM_WINDOW as WINDOW, byte_tokenizer, tiny_model  # noqa: E402

SPAN = SINKS + WINDOW
SHORT = "The cat sat."  # 12 byte tokens: inside sinks + window
# the shipped rolling task's long document, cut to 1,000 bytes (the CPU time of the suite)
LONG = json.loads((TASKS_DIR / "ahn_smoke" / "ppl.jsonl").read_text().splitlines()[-1])["text"][:1000]
TASKS = ["ahn_smoke_choice", "ahn_smoke_ppl", "ahn_smoke_gen"]
ARGS = dict(dtype="float32", device="cpu", batch_size=1)


def requests():
    gen = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}
    return {
        "loglikelihood": [Instance("loglikelihood", {}, ("Bees make", " honey"), 0),
                          Instance("loglikelihood", {}, (LONG[:400], " harbor"), 1)],
        "loglikelihood_rolling": [Instance("loglikelihood_rolling", {}, (SHORT,), 0),
                                  Instance("loglikelihood_rolling", {}, (LONG,), 1)],
        "generate_until": [Instance("generate_until", {}, ("Question: why?\nAnswer:", gen), 0),
                           Instance("generate_until", {}, (LONG[:300], gen), 1)],
    }


def run_all(lm) -> dict:
    return {kind: getattr(lm, kind)(reqs) for kind, reqs in requests().items()}


@pytest.fixture(scope="module")
def results(byte_lm):
    """Every request type through plain HFLM and through the ahn model in each mode."""
    model_dir, adapter_dir = byte_lm
    out = {"hf": run_all(HFLM(pretrained=model_dir, **ARGS))}
    for mode in ("full", "window", "ahn"):
        lm = AHNLM(pretrained=model_dir, adapter=adapter_dir, window=WINDOW, sinks=SINKS, mode=mode, **ARGS)
        out[mode] = run_all(lm)
    return out


@pytest.fixture(scope="module")
def task_manager():
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def test_full_mode_is_plain_hflm_request_by_request(results):
    assert results["full"] == results["hf"]
    assert len(results["full"]["generate_until"]) == 2 and all(isinstance(s, str) for s in results["full"]["generate_until"])


def test_window_and_ahn_differ_from_full_only_beyond_the_window(results):
    assert len(LONG.encode()) > 10 * SPAN
    for mode in ("window", "ahn"):
        r = results[mode]
        # inside sinks + window every mode sees the same context
        assert r["loglikelihood"][0][0] == pytest.approx(results["full"]["loglikelihood"][0][0], abs=1e-3)
        assert r["loglikelihood_rolling"][0] == pytest.approx(results["full"]["loglikelihood_rolling"][0], abs=1e-3)
        # beyond it the window drops context, and the memory reads it back
        assert abs(r["loglikelihood_rolling"][1] - results["full"]["loglikelihood_rolling"][1]) > 1e-2
        assert abs(r["loglikelihood"][1][0] - results["full"]["loglikelihood"][1][0]) > 1e-4
        assert all(isinstance(s, str) for s in r["generate_until"])
    assert abs(results["ahn"]["loglikelihood_rolling"][1] - results["window"]["loglikelihood_rolling"][1]) > 1e-2


def test_rolling_loglikelihood_runs_with_the_bounded_cache(byte_lm):
    """The decoder's output cache on the long document: an AHNCache of sinks + window entries and the
    same size as after a short one in "ahn" mode; a DynamicCache of every token in "full" mode."""
    model_dir, adapter_dir = byte_lm
    seen = {}
    for mode in ("ahn", "full"):
        lm = AHNLM(pretrained=model_dir, adapter=adapter_dir, window=WINDOW, sinks=SINKS, mode=mode, **ARGS)
        calls = []

        def hook(module, args, kwargs, output):
            cache = output_cache(output)
            calls.append((kwargs["input_ids"].shape[1], type(cache).__name__, cache.get_seq_length(),
                          getattr(cache, "kv_length", None), getattr(cache, "nbytes", None)))

        handle = lm.model.base_model.get_decoder().register_forward_hook(hook, with_kwargs=True)
        for text in (LONG[:3 * SPAN], LONG):
            lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
        handle.remove()
        seen[mode] = calls
    (t_mid, *_), (t_long, *_) = seen["ahn"]
    assert t_long == len(LONG.encode()) > t_mid > SPAN  # one pass over the whole document (max_length unbounded)
    (_, kind, length, kv, mid_bytes), (_, _, _, kv_long, long_bytes) = seen["ahn"]
    assert kind == "AHNCache" and kv == kv_long == SPAN and mid_bytes == long_bytes
    assert [(c[1], c[2]) for c in seen["full"]] == [("DynamicCache", t_mid), ("DynamicCache", t_long)]


def test_max_length_is_unbounded_in_window_and_ahn_modes(byte_lm):
    model_dir, adapter_dir = byte_lm
    lm = AHNLM(pretrained=model_dir, adapter=adapter_dir, mode="window", **ARGS)
    assert lm.max_length == UNBOUNDED
    assert lm.model.ahn_config.window == WINDOW and lm.model.ahn_config.sinks == SINKS  # the adapter's
    lm = AHNLM(pretrained=model_dir, adapter=adapter_dir, mode="full", **ARGS)
    assert lm.max_length == 4096  # HFLM's default: max_position_embeddings
    lm = AHNLM(pretrained=model_dir, mode="ahn", window=8, sinks=2, max_length=100, **ARGS)
    assert lm.max_length == 100 and lm.model.ahn_config.window == 8 and lm.model.ahn_config.sinks == 2


def test_task_metrics_match_plain_hflm_in_full_mode(byte_lm, task_manager):
    model_dir, adapter_dir = byte_lm
    scores = {}
    for name, lm in (("hf", HFLM(pretrained=model_dir, **ARGS)),
                     ("full", AHNLM(pretrained=model_dir, adapter=adapter_dir, mode="full", **ARGS))):
        out = simple_evaluate(model=lm, tasks=TASKS, task_manager=task_manager, log_samples=False)
        scores[name] = {t: {k: v for k, v in out["results"][t].items() if k != "alias"} for t in TASKS}
    assert scores["full"] == scores["hf"]
    assert set(scores["full"]["ahn_smoke_ppl"]) >= {"word_perplexity,none", "bits_per_byte,none"}


def test_cli_writes_a_scores_file_from_any_directory(byte_lm, tmp_path):
    """``python -m ahn.lm_eval`` registers the model and finds the shipped task without --include_path."""
    model_dir, adapter_dir = byte_lm
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    cmd = [sys.executable, "-m", "ahn.lm_eval", "run", "--model", "ahn", "--model_args",
           f"pretrained={model_dir},adapter={adapter_dir},mode=ahn,dtype=float32", "--device", "cpu",
           "--tasks", "ahn_smoke_choice", "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list((tmp_path / "out").rglob("results_*.json"))
    assert len(files) == 1
    result = json.loads(files[0].read_text())
    assert 0.0 <= result["results"]["ahn_smoke_choice"]["acc,none"] <= 1.0
    assert result["config"]["model"] == "ahn"


def test_bad_model_args_name_the_value_and_the_fix(byte_lm, tmp_path):
    model_dir, _ = byte_lm
    cases = [
        (dict(mode="sliding"), "mode='sliding': must be one of full, window, ahn"),
        (dict(adapter=str(tmp_path / "nowhere")), f"adapter='{tmp_path / 'nowhere'}': no such directory"),
        (dict(window=0), "window=0: must be an integer >= 1"),
        (dict(window="big"), "window='big': must be an integer >= 1"),
        (dict(sinks=-1), "sinks=-1: must be an integer >= 0"),
        (dict(mode="ahn", batch_size="auto"), "batch_size='auto' with mode=ahn"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as e:
            AHNLM(pretrained=model_dir, **{**ARGS, **kwargs})
        assert message in str(e.value)
    # an adapter trained for another base model (other hidden size)
    tok = byte_tokenizer()
    other = tiny_model(vocab_size=len(tok), hidden_size=64, intermediate_size=64, tie_word_embeddings=False)
    ahn.add_memory(other, ahn.AHNConfig(window=WINDOW, sinks=SINKS)).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError) as e:
        AHNLM(pretrained=model_dir, adapter=str(tmp_path / "other"), **ARGS)
    assert f"adapter='{tmp_path / 'other'}' with pretrained='{model_dir}'" in str(e.value)
    assert "use the adapter trained for this base model" in str(e.value)


def test_shipped_task_folder_is_added_only_when_needed():
    from ahn.lm_eval.__main__ import with_shipped_tasks

    assert with_shipped_tasks(["run", "--tasks", "ahn_smoke_gen"])[-2:] == ["--include_path", str(TASKS_DIR)]
    assert with_shipped_tasks(["run", "--tasks=hellaswag,ahn_smoke"])[-1] == str(TASKS_DIR)
    assert with_shipped_tasks(["run", "--tasks", "hellaswag"]) == ["run", "--tasks", "hellaswag"]
    mine = ["run", "--tasks", "ahn_smoke", "--include_path", "/x"]
    assert with_shipped_tasks(mine) == mine


def test_an_unknown_model_arg_or_backend_is_named_with_the_valid_ones(tmp_path):
    """Item 13 of issue 25: ``windw=8`` raised Qwen2ForCausalLM's TypeError; ``backend=bogus`` gave a message that
    began with every model_arg (window=None, sinks=None ...)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    tok = byte_tokenizer()
    model_dir = str(tmp_path / "model")
    AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=4,
                                                 num_key_value_heads=2)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    with pytest.raises(ValueError) as e:
        AHNLM(pretrained=model_dir, windw=8, **ARGS)
    message = str(e.value)
    assert message.startswith("model_args windw=8: unknown argument (did you mean window?)")
    assert "ahn takes pretrained, adapter, window, sinks, mode, backend" in message and "max_length" in message
    with pytest.raises(ValueError) as e:
        AHNLM(pretrained=model_dir, backend="bogus", **ARGS)
    assert str(e.value).startswith("model_args backend='bogus': must be one of auto, ")
