"""`ahn eval` end to end on a tiny random Qwen2 with a byte-level tokenizer, in all three modes.

The shipped samples (one per task, in each benchmark's record format) run through
``ahn.cli.main``; resumed runs must reproduce a fresh run's files; bad data must exit 2 with
the file, line and field named. RULER samples are generated for the tiny tokenizer.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import ahn
import ahn.benchmarks
from ahn.benchmarks import ruler
from ahn.benchmarks.evaluate import Sample, build_input_ids, truncate_prompt
from ahn.cli import main
from helpers import BYTE_LM_SINKS as SINKS, BYTE_LM_WINDOW as WINDOW, byte_tokenizer

SAMPLES = Path(ahn.benchmarks.__file__).parent / "data" / "samples"
def eval_args(byte_lm, bench, out, *extra):
    model_dir, adapter_dir = byte_lm
    return ["eval", bench, "--model", model_dir, "--adapter", adapter_dir, "--window", str(WINDOW), "--sinks",
            str(SINKS), "--out", str(out), "--dtype", "float32", "--device", "cpu", *extra]


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def files_of(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
            and p.suffix != ".png"}


MODES = ("full", "window", "ahn")


@pytest.mark.parametrize("bench, n_datasets", [("lveval", 4), ("infinitebench", 12), ("longbench", 6)])
def test_benchmark_samples_run_in_every_mode(byte_lm, tmp_path, capsys, bench, n_datasets):
    out = tmp_path / bench
    extra = ["--data", str(SAMPLES / bench), "--max-new-tokens", "3"]
    if bench == "lveval":
        extra += ["--datasets", "hotpotwikiqa_mixup,factrecall_zh,cmrc_mixup,dureader_mixup", "--lengths", "16k"]
    assert main(eval_args(byte_lm, bench, out, *extra)) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert len(results["scores"]) == n_datasets and results["chat_template"] is True
    for dataset, row in results["scores"].items():
        assert set(row) == set(MODES) and all(0.0 <= v <= 100.0 for v in row.values())
        assert f"| {dataset} |" in printed and f"| {dataset} |" in (out / "results.md").read_text()
        n_records = len((SAMPLES / bench / f"{dataset}.jsonl").read_text().splitlines())
        for m in MODES:
            lines = read_lines(out / m / f"{dataset}.jsonl")
            assert [line["id"] for line in lines] == [str(i) for i in range(n_records)]
            for line in lines:
                assert 0 <= line["new_tokens"] <= 3 and isinstance(line["pred"], str)
                # the chat template wraps the prompt, except LongBench's few-shot triviaqa (as in pred.py)
                assert (line["input_tokens"] > line["prompt_tokens"]) == (dataset != "triviaqa")
    assert (out / "results.png").stat().st_size > 0


def test_modes_differ_beyond_the_window_and_full_is_the_base_model(byte_lm, tmp_path):
    """Prompts are longer than sinks + window: window and ahn see different contexts than full."""
    out = tmp_path / "lb"
    main(eval_args(byte_lm, "longbench", out, "--data", str(SAMPLES / "longbench"), "--datasets", "narrativeqa",
                   "--max-new-tokens", "8"))
    preds = {m: read_lines(out / m / "narrativeqa.jsonl")[0] for m in MODES}
    assert preds["full"]["input_tokens"] > SINKS + WINDOW
    assert len({preds[m]["pred"] for m in MODES}) == 3
    # "full" is the unmodified base model's greedy continuation
    model_dir, _ = byte_lm
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = byte_tokenizer()
    rec = json.loads((SAMPLES / "longbench" / "narrativeqa.jsonl").read_text())
    from ahn.benchmarks.longbench import PROMPTS

    prompt = PROMPTS["narrativeqa"].format(**rec)
    ids = build_input_ids(tok, Sample("0", prompt, 8, {}), prompt, True)
    x = torch.tensor([ids])
    gen = base.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert tok.decode(gen[0, len(ids):], skip_special_tokens=True) == preds["full"]["pred"]


def test_resumed_run_produces_the_same_files(byte_lm, tmp_path):
    args = ["--data", str(SAMPLES / "infinitebench"), "--datasets", "passkey,kv_retrieval,math_find",
            "--max-new-tokens", "4"]
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    assert main(eval_args(byte_lm, "infinitebench", fresh, *args)) == 0
    # an interrupted run: one dataset done in one mode only, and a half-written line elsewhere
    main(eval_args(byte_lm, "infinitebench", resumed, *args[:3], "passkey", "--max-new-tokens", "4",
                   "--modes", "window"))
    (resumed / "ahn").mkdir()
    (resumed / "ahn" / "math_find.jsonl").write_text('{"id": "0", "pred": "8')
    assert main(eval_args(byte_lm, "infinitebench", resumed, *args)) == 0
    assert files_of(resumed) == files_of(fresh)
    # a finished run is not redone
    before = (resumed / "full" / "passkey.jsonl").stat().st_mtime_ns
    assert main(eval_args(byte_lm, "infinitebench", resumed, *args)) == 0
    assert (resumed / "full" / "passkey.jsonl").stat().st_mtime_ns == before


def test_resume_refuses_other_settings(byte_lm, tmp_path, capsys):
    args = ["--data", str(SAMPLES / "infinitebench"), "--datasets", "passkey", "--max-new-tokens", "2"]
    main(eval_args(byte_lm, "infinitebench", tmp_path, *args, "--modes", "full"))
    with pytest.raises(SystemExit) as e:
        main(eval_args(byte_lm, "infinitebench", tmp_path, *args[:-1], "3", "--modes", "full"))
    assert e.value.code == 2 and "max_new_tokens: 2 -> 3" in capsys.readouterr().err


def test_resume_refuses_an_overwritten_adapter(byte_lm, tmp_path, capsys):
    """The adapter is fingerprinted by content: new weights at the same path never mix with old predictions."""
    _, adapter_dir = byte_lm
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir, adapter)
    model_dir = byte_lm[0]
    args = ["--data", str(SAMPLES / "infinitebench"), "--datasets", "passkey", "--max-new-tokens", "1", "--modes",
            "ahn"]
    out = tmp_path / "out"
    assert main(eval_args((model_dir, str(adapter)), "infinitebench", out, *args)) == 0
    first = json.loads((out / "run.json").read_text())["adapter_sha256"]
    assert main(eval_args((model_dir, str(adapter)), "infinitebench", out, *args)) == 0  # same content: resumes
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ahn.add_memory(base, ahn.AHNConfig(window=WINDOW, sinks=SINKS)).save_pretrained(adapter)  # other weights
    before = (out / "ahn" / "passkey.jsonl").read_bytes()
    with pytest.raises(SystemExit) as e:
        main(eval_args((model_dir, str(adapter)), "infinitebench", out, *args))
    assert e.value.code == 2 and f"adapter_sha256: {first!r} -> " in capsys.readouterr().err
    assert (out / "ahn" / "passkey.jsonl").read_bytes() == before


def test_model_loading_errors_name_the_path(byte_lm, tmp_path, capsys):
    model_dir, _ = byte_lm
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(Path(model_dir) / name, no_tokenizer)
    truncated = tmp_path / "truncated"
    shutil.copytree(byte_lm[1], truncated)
    weights = truncated / "ahn_adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    for model, adapter, message in [
        (str(no_tokenizer), byte_lm[1], f"the tokenizer of '{no_tokenizer}' is missing"),
        (str(tmp_path / "nowhere"), byte_lm[1],
         f"ahn eval: error: model '{tmp_path / 'nowhere'}' not found: no such directory, and not a reachable Hub id"),
        (model_dir, str(truncated), f"{weights} is not a readable safetensors file"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(eval_args((model, adapter), "longbench", tmp_path / "o", "--data", str(SAMPLES / "longbench")))
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content, message", [
    ('{"input": "q", "context": "c", "answers": ["a"]}\n{"input": "q", "context": "c"}\n',
     r"hotpotwikiqa_mixup_16k.jsonl, line 2: field 'answers' is missing"),
    ('{"input": "q", "context": "c", "answers": ["a"]}\n{"input": "q", "context": 3, "answers": ["a"]}\n',
     r"line 2: field 'context' must be a str"),
    ('{"input": "q", "context": "c", "answers": ["a"]}\n{not json\n', r"line 2: not valid JSON"),
])
def test_malformed_data_exits_2_naming_file_line_and_field(byte_lm, tmp_path, capsys, content, message):
    data = tmp_path / "data"
    data.mkdir()
    (data / "hotpotwikiqa_mixup_16k.jsonl").write_text(content)
    with pytest.raises(SystemExit) as e:
        main(eval_args(byte_lm, "lveval", tmp_path / "out", "--data", str(data), "--datasets", "hotpotwikiqa_mixup",
                       "--lengths", "16k"))
    assert e.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_input_errors_exit_2(byte_lm, tmp_path, capsys):
    for extra, message in [
        (["--data", str(SAMPLES / "lveval"), "--lengths", "16k"], "lacks loogle_SD_mixup_16k.jsonl"),
        (["--data", str(SAMPLES / "lveval"), "--lengths", "20k"], "LV-Eval length levels"),
        (["--data", str(SAMPLES / "lveval"), "--modes", "full,sliding"], "each mode must be one of"),
        ([], "--data is required"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(eval_args(byte_lm, "lveval", tmp_path / "o", *extra))
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_truncation_keeps_start_and_end():
    tok = byte_tokenizer()
    prompt = "START " + "middle " * 200 + "question END"
    for halves in (True, False):
        text, n, truncated = truncate_prompt(tok, prompt, 40, decode_halves=halves)
        assert truncated and n == len(prompt.encode())
        assert text.startswith("START middle") and text.endswith("question END") and len(text.encode()) == 40
    assert truncate_prompt(tok, "short", 40, True) == ("short", 5, False)


def test_truncation_needs_two_tokens(byte_lm, tmp_path, capsys):
    """Middle truncation keeps max_length // 2 tokens from each end: below 2 it would keep everything."""
    tok = byte_tokenizer()
    prompt = "START " + "middle " * 20 + "END"
    with pytest.raises(ValueError, match="max_length=1 must be at least 2 tokens"):
        truncate_prompt(tok, prompt, 1, decode_halves=True)
    assert truncate_prompt(tok, prompt, 3, decode_halves=False)[0] == "SD"  # odd: 1 + 1, as the official harnesses
    for value in ("1", "-5"):
        with pytest.raises(SystemExit) as e:
            main(eval_args(byte_lm, "longbench", tmp_path / "o", "--data", str(SAMPLES / "longbench"), "--max-length",
                           value))
        assert e.value.code == 2 and f"argument --max-length: {value} must be >= 2" in capsys.readouterr().err


def test_truncation_applies_to_long_samples(byte_lm, tmp_path):
    out = tmp_path / "t"
    main(eval_args(byte_lm, "longbench", out, "--data", str(SAMPLES / "longbench"), "--datasets", "hotpotqa",
                   "--max-length", "64", "--max-new-tokens", "1", "--modes", "window"))
    line = read_lines(out / "window" / "hotpotqa.jsonl")[0]
    assert line["truncated"] and line["prompt_tokens"] > 64 and line["input_tokens"] < line["prompt_tokens"]


# ----------------------------------------------------------------------------- RULER
class _Args:
    def __init__(self, **kw):
        self.__dict__.update(dict(datasets=None, lengths="3000", data=None, limit=2, seed=7), **kw)


def test_ruler_samples_fit_the_length_and_contain_their_answers():
    tok = byte_tokenizer()
    datasets = ruler.load(_Args(), tok, use_chat=True)
    assert [d.name for d in datasets] == [f"{t}_3000" for t in ruler.TASKS]
    for d in datasets:
        assert len(d.samples) == 2
        for s in d.samples:
            n = len(build_input_ids(tok, s, s.prompt, True)) + s.max_new_tokens
            assert 0.75 * 3000 <= n <= 3000, (d.name, n)  # sized to the length, never over it
            outputs = s.reference["outputs"]
            task = d.name.rsplit("_", 1)[0]
            if task.startswith("niah") or task == "vt":
                assert all(o in s.prompt for o in outputs)
                assert d.score(" ".join(outputs), s) == 1.0 and d.score("nothing", s) == 0.0
            if task == "niah_multivalue" or task == "niah_multiquery":
                assert len(outputs) == 4
            if task == "vt":
                value = re.search(r"assigned the value (\d+)", s.answer_prefix).group(1)
                assert f"VAR {outputs[0]} = {value}" in s.prompt and len(outputs) == 5
            if task == "cwe":
                listing = s.prompt.rsplit("Memorize the ones", 1)[1]
                counts = Counter(re.findall(r"\d+\. ([a-z-]+)", listing))
                assert {w for w, _ in counts.most_common(10)} == set(outputs)
            if task == "fwe":
                counts = Counter(s.prompt.split("coded words. ", 1)[1].split("\nQuestion")[0].split())
                assert [w for w, _ in counts.most_common(4)][1:] == outputs and counts.most_common(1)[0][0] == "..."


def test_ruler_is_deterministic_per_seed_and_reads_a_haystack_file(tmp_path):
    tok = byte_tokenizer()
    one = ruler.load(_Args(datasets="niah_single_2"), tok, True)[0].samples
    two = ruler.load(_Args(datasets="niah_single_2"), tok, True)[0].samples
    other = ruler.load(_Args(datasets="niah_single_2", seed=8), tok, True)[0].samples
    assert one == two and one != other
    hay = tmp_path / "hay.txt"
    hay.write_text("Zebras graze quietly. " * 50)
    s = ruler.load(_Args(datasets="niah_single_2", data=str(hay)), tok, True)[0].samples[0]
    assert "Zebras graze quietly." in s.prompt and "harbor" not in s.prompt
    with pytest.raises(ValueError, match=r"--lengths 60 is too short for niah_single_1: .* --lengths \d+ or more"):
        ruler.load(_Args(datasets="niah_single_1", lengths="60"), tok, True)
    with pytest.raises(ValueError, match="--lengths 10 is too short for vt"):  # shorter than the answer alone
        ruler.load(_Args(datasets="vt", lengths="10"), tok, True)


def test_ruler_end_to_end(byte_lm, tmp_path):
    out = tmp_path / "r"
    assert main(eval_args(byte_lm, "ruler", out, "--lengths", "3000", "--datasets", "niah_single_1,vt", "--limit", "1",
                          "--max-new-tokens", "2")) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["scores"]) == {"niah_single_1_3000", "vt_3000"} and results["seed"] == 42


# ----------------------------------------------------------------------------- perplexity
def test_perplexity_by_position(byte_lm, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(random.Random(0).choice(["alpha", "beta", "gamma", "delta"]) for _ in range(120)))
    out = tmp_path / "p"
    assert main(eval_args(byte_lm, "perplexity", out, "--data", str(text), "--lengths", "128", "--limit", "2")) == 0
    results = json.loads((out / "results.json").read_text())
    inside, beyond = f"128 tokens, p < {SINKS + WINDOW}", f"128 tokens, p >= {SINKS + WINDOW}"
    assert set(results["scores"]) == {inside, beyond}
    assert results["samples"][inside]["full"] == 2 * (SINKS + WINDOW) and results["samples"][beyond]["ahn"] == 2 * (
        127 - SINKS - WINDOW)
    # inside sinks + window every mode computes the same thing; beyond it they differ
    s = results["scores"]
    assert s[inside]["full"] == pytest.approx(s[inside]["window"], abs=1e-3)
    assert s[inside]["full"] == pytest.approx(s[inside]["ahn"], abs=1e-3)
    assert abs(s[beyond]["full"] - s[beyond]["window"]) > 1e-3 and abs(s[beyond]["window"] - s[beyond]["ahn"]) > 1e-3
    before = files_of(out)
    (out / "ahn" / "ppl_128.jsonl").write_text((out / "ahn" / "ppl_128.jsonl").read_text().splitlines()[0] + "\n")
    assert main(eval_args(byte_lm, "perplexity", out, "--data", str(text), "--lengths", "128", "--limit", "2")) == 0
    assert files_of(out) == before
    with pytest.raises(SystemExit):
        main(eval_args(byte_lm, "perplexity", tmp_path / "q", "--data", str(text), "--lengths", "100000"))


def test_perplexity_lengths_below_two_tokens_name_the_flag(byte_lm, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("alpha beta " * 50)
    with pytest.raises(SystemExit) as e:
        main(eval_args(byte_lm, "perplexity", tmp_path / "p", "--data", str(text), "--lengths", "1"))
    assert e.value.code == 2 and "--lengths 1: each length must be at least 2 tokens" in capsys.readouterr().err


# ----------------------------------------------------------------------------- several processes
DIST_ARGS = ["--data", str(SAMPLES / "infinitebench"), "--datasets",
             "passkey,kv_retrieval,math_find,code_debug,longbook_choice_eng", "--max-new-tokens", "3"]


def torchrun(args: list[str], cwd: Path) -> None:
    """``python -m torch.distributed.run --standalone --nproc_per_node 2 -m ahn ARGS`` (gloo, CPU)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "ahn", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def one_process(args: list[str]) -> None:
    """In this process, with one thread like each torchrun worker (OMP_NUM_THREADS=1): the same arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)


def top_level(out: Path) -> dict[str, bytes]:
    return {k: v for k, v in files_of(out).items() if not k.startswith("ranks/")}


@pytest.fixture(scope="module")
def two_ranks(byte_lm, tmp_path_factory):
    """(one-process run, two-process run) of the same infinitebench samples."""
    root = tmp_path_factory.mktemp("dist")
    single, double = root / "single", root / "double"
    one_process(eval_args(byte_lm, "infinitebench", single, *DIST_ARGS))
    torchrun(eval_args(byte_lm, "infinitebench", double, *DIST_ARGS), cwd=root)
    return single, double


def test_two_processes_write_the_files_of_one(two_ranks):
    single, double = two_ranks
    assert json.loads((double / "results.json").read_text()) == json.loads((single / "results.json").read_text())
    assert top_level(double) == top_level(single)  # predictions, run.json, results.md: byte for byte
    # each rank ran its own share: every other sample of the run's order, none twice
    ids = {r: {p.stem for p in (double / "ranks" / str(r) / "ahn").glob("*.jsonl")} for r in (0, 1)}
    assert ids == {0: {"passkey", "math_find", "longbook_choice_eng"}, 1: {"kv_retrieval", "code_debug"}}
    full = read_lines(double / "full" / "passkey.jsonl")
    assert full == read_lines(double / "ranks" / "0" / "full" / "passkey.jsonl") and full[0]["pred"] != ""


def test_a_rerun_with_another_world_size_resumes_from_the_rank_folders(byte_lm, two_ranks, tmp_path):
    """An interrupted two-process run (rank 1 lost its last sample in two modes), resumed by one process."""
    single, double = two_ranks
    out = tmp_path / "resumed"
    shutil.copytree(double, out)
    for name in [*MODES, "results.json", "results.md", "results.png"]:
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    for m in ("window", "ahn"):
        (out / "ranks" / "1" / m / "code_debug.jsonl").unlink()
    # a marker on rank 0's lines: the merge takes finished samples from the rank folders instead of redoing them
    marked = out / "ranks" / "0" / "full" / "passkey.jsonl"
    marked.write_text("".join(json.dumps({**r, "mark": 1}, ensure_ascii=False) + "\n" for r in read_lines(marked)))
    rank0 = files_of(out / "ranks" / "0")
    one_process(eval_args(byte_lm, "infinitebench", out, *DIST_ARGS))
    merged = read_lines(out / "full" / "passkey.jsonl")
    assert [r.pop("mark") for r in merged] == [1]
    (out / "full" / "passkey.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged))
    assert top_level(out) == top_level(single)
    assert files_of(out / "ranks" / "0") == rank0  # rank folders are read, never rewritten


def test_perplexity_across_two_processes(byte_lm, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(random.Random(0).choice(["alpha", "beta", "gamma", "delta"]) for _ in range(150)))
    args = ["--data", str(text), "--lengths", "128", "--limit", "4"]
    one_process(eval_args(byte_lm, "perplexity", tmp_path / "single", *args))
    torchrun(eval_args(byte_lm, "perplexity", tmp_path / "double", *args), cwd=tmp_path)
    assert top_level(tmp_path / "double") == top_level(tmp_path / "single")
    for r, ids in ((0, ["0", "2"]), (1, ["1", "3"])):
        assert [x["id"] for x in read_lines(tmp_path / "double" / "ranks" / str(r) / "ahn" / "ppl_128.jsonl")] == ids


@pytest.mark.parametrize("bad, message", [("123", "line 2: expected a JSON object, got int"),
                                          ('{"pred": "x"}', 'line 2: a prediction needs an "id"'),
                                          ('{"id": ["a"]}', 'line 2: a prediction needs an "id"')])
def test_merge_ranks_names_the_file_and_line_of_a_record_that_is_not_a_prediction(tmp_path, bad, message):
    """Item 8 of issue 25: a rank file line that is valid JSON but not an object, or lacks "id", ended ``ahn eval`` in
    a TypeError / KeyError traceback and no results."""
    from ahn.benchmarks.evaluate import merge_ranks, predictions_path

    rank = predictions_path(tmp_path / "ranks" / "1", "full", "qa")
    rank.parent.mkdir(parents=True)
    rank.write_text(json.dumps({"id": "a", "pred": "x"}) + "\n" + bad + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{rank}, {message}")):
        merge_ranks(tmp_path, ["full"], {"qa": ["a", "b"]})


def test_read_finished_refuses_a_complete_line_that_is_not_json(tmp_path):
    """Item 15 of issue 25: a complete line that is not JSON was skipped, so a rerun with another world size recomputed
    that sample and appended it at the end (another line order than one process gives); it is refused, naming the
    file and the line, as a rerun with the same world size does. An unfinished last line (a rank still writing)
    is left out."""
    from ahn.benchmarks.evaluate import read_finished

    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"id": "a"}) + "\n" + '{"id": "b", "pre')
    assert read_finished(path) == [{"id": "a"}]
    path.write_text(json.dumps({"id": "a"}) + "\n" + '{"id": "b", "pre\n' + json.dumps({"id": "c"}) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 2: not valid JSON")):
        read_finished(path)
