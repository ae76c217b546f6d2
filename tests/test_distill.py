"""ahn.distill: losses on hand-computed cases, window sampling, data loading, and training runs.

Training runs use a tiny random Qwen2 (initializer_range 0.2, so that the far context
matters to its predictions) on CPU; each takes a few seconds.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM, TrainerCallback

from ahn import AHNModel
from ahn.cli import main as cli
from ahn.distill.config import DistillConfig
from ahn.distill.data import DistillCollator, load_records, prepare_dataset
from ahn.distill.losses import (
    chunked_head_losses,
    cross_entropy,
    distill_positions,
    hidden_mse,
    kl_divergence,
    next_token_targets,
)
from ahn.distill.sampling import PAPER_BUDGETS, PAPER_SINKS, WindowSampler
from ahn.distill.trainer import LOG_NAME, RUN_CONFIG_NAME, build_trainer, distill
from helpers import tiny_qwen2_config

VOCAB = 64


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    torch.manual_seed(0)
    cfg = tiny_qwen2_config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, max_position_embeddings=256,
                            tie_word_embeddings=False, initializer_range=0.2)
    path = tmp_path_factory.mktemp("tiny") / "model"
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return str(path)


def write_jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def token_data(tmp_path_factory) -> str:
    gen = torch.Generator().manual_seed(0)
    records = [{"input_ids": torch.randint(0, VOCAB, (48,), generator=gen).tolist()} for _ in range(4)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", records)


def run_config(model, data, out, **kw) -> DistillConfig:
    base = dict(model=model, data=str(data), output=str(out), window=16, sinks=4, min_length=20, batch_size=4,
                max_steps=6, save_steps=3, logging_steps=1, learning_rate=3e-2, warmup_ratio=0.0, progress=False)
    return DistillConfig(**{**base, **kw})


def read_log(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / LOG_NAME).read_text().splitlines()]


def adapter_weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out) / "ahn_adapter.safetensors"))


# ---------------------------------------------------------------------- losses
def test_kl_divergence_hand_computed():
    teacher = torch.tensor([[0.0, math.log(3.0)]])  # softmax: [1/4, 3/4]
    student = torch.zeros(1, 2)  # [1/2, 1/2]
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert kl_divergence(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    assert kl_divergence(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    # Temperature 2 halves the logits and scales by 4: softmax([0, ln 3 / 2]) = [1 / (1 + sqrt 3), ...].
    p = 1 / (1 + math.sqrt(3))
    expected_t2 = 4 * (p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5))
    assert kl_divergence(student, teacher, temperature=2.0).item() == pytest.approx(expected_t2, rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        kl_divergence(student, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="temperature"):
        kl_divergence(student, teacher, temperature=0)


def test_cross_entropy_and_hidden_mse_hand_computed():
    ce = cross_entropy(torch.zeros(2, 2), torch.tensor([1, -100]))
    assert ce.tolist() == pytest.approx([math.log(2.0), 0.0])
    assert hidden_mse(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)).item() == pytest.approx(2.5)


def test_distill_positions_beyond_window_and_response_only():
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0],   # right-padded, 6 tokens
                         [0, 0, 1, 1, 1, 1, 1, 1]])  # left-padded, 6 tokens
    pos = distill_positions(mask, window=2, sinks=1)  # positions >= 3 of each row's real tokens
    assert pos.tolist() == [[0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1, 1, 1]]
    labels = torch.tensor([[-100, -100, -100, -100, 7, 8, -100, -100],
                           [-100, -100, -100, -100, -100, -100, 5, -100]])
    pos = distill_positions(mask, window=2, sinks=1, labels=labels)  # next token must carry a label
    assert pos.tolist() == [[0, 0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1, 0, 0]]
    assert next_token_targets(labels)[0].tolist() == [-100, -100, -100, 7, 8, -100, -100, -100]
    with pytest.raises(ValueError, match="attention_mask"):
        distill_positions(mask[0], 2, 1)


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunked_head_losses_equal_the_unchunked_sum(chunk):
    gen = torch.Generator().manual_seed(0)
    hs = torch.randn(7, 5, generator=gen, requires_grad=True)
    ht = torch.randn(7, 5, generator=gen)
    w, b = torch.randn(11, 5, generator=gen), torch.randn(11, generator=gen)
    targets = torch.tensor([1, 2, -100, 3, 4, 5, -100])
    kw = torch.rand(7, generator=gen) * 3
    kl, ce = chunked_head_losses(hs, ht, w, b, targets, kw, temperature=1.5, chunk=chunk)
    (kl + ce).backward()
    grad = hs.grad.clone()
    hs.grad = None
    s, t = hs @ w.T + b, ht @ w.T + b
    kl_ref, ce_ref = (kl_divergence(s, t, 1.5) * kw).sum(), cross_entropy(s, targets).sum()
    (kl_ref + ce_ref).backward()
    torch.testing.assert_close(kl, kl_ref)
    torch.testing.assert_close(ce, ce_ref)
    torch.testing.assert_close(grad, hs.grad)


# ---------------------------------------------------------------------- window sampling
def test_fixed_sampler_and_random_draws_follow_the_paper_bounds():
    assert WindowSampler(window=16, sinks=4).draw(100, step=3) == (16, 4)
    sampler = WindowSampler(seed=1)
    seen = set()
    for step in range(200):
        L = [300, 2000, 20000][step % 3]
        w, s = sampler.draw(L, step)
        c = w + s
        assert c in PAPER_BUDGETS and L / 8 < c < L, (L, w, s)
        assert s in PAPER_SINKS and s <= c / 2
        seen.add((L, c, s))
        assert sampler.draw(L, step) == (w, s)  # a function of (seed, step, micro): resumable
    assert len(seen) > 20  # actually random
    draws = lambda sd: [WindowSampler(seed=sd).draw(20000, k) for k in range(20)]  # noqa: E731
    assert draws(1) != draws(2)
    assert WindowSampler().draw(20, 0) == (10, 0)  # shorter than every budget: half lossless


def test_sampler_errors():
    with pytest.raises(ValueError, match="window"):
        WindowSampler(window=0)
    with pytest.raises(ValueError, match="budgets"):
        WindowSampler(budgets=())
    with pytest.raises(ValueError, match="min_budget_fraction"):
        WindowSampler(min_budget_fraction=1.5)


# ---------------------------------------------------------------------- config and CLI
def test_config_yaml_flags_and_errors(tmp_path, tiny_model, token_data):
    yml = tmp_path / "run.yaml"
    yml.write_text(f"model: {tiny_model}\ndata: {token_data}\noutput: {tmp_path / 'o'}\nwindow: 8\nlearning_rate: 0.01\n")
    cfg = DistillConfig.from_yaml(yml, learning_rate=0.5)
    assert cfg.window == 8 and cfg.learning_rate == 0.5 and cfg.memory == "gated_deltanet"
    assert DistillConfig.from_dict(json.loads(json.dumps(cfg.__dict__))) == cfg
    (tmp_path / "bad.yaml").write_text("modle: x\n")
    with pytest.raises(ValueError, match="unknown keys \\['modle'\\]"):
        DistillConfig.from_yaml(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="window='wide'"):
        DistillConfig(window="wide")
    with pytest.raises(ValueError, match="nothing to train"):
        DistillConfig(kl_weight=0)
    with pytest.raises(ValueError, match="missing model, data, output"):
        DistillConfig().check_required()


def test_cli_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["distill", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    from dataclasses import fields

    for f in fields(DistillConfig):
        assert "--" + f.name.replace("_", "-") in text
    assert "torchrun" in text


def test_cli_reports_missing_and_bad_values(capsys, tmp_path):
    assert cli_exit(["distill", "--data", "x.jsonl"]) == 2
    assert "missing model, output" in capsys.readouterr().err
    assert cli_exit(["distill", "--model", "m", "--data", "d", "--output", str(tmp_path), "--window", "-3"]) == 2
    assert "window=-3" in capsys.readouterr().err


def cli_exit(argv) -> int:
    try:
        return cli(argv)
    except SystemExit as e:
        return e.code


# ---------------------------------------------------------------------- data
def test_malformed_records_name_file_line_and_field(tmp_path):
    cases = {
        '{"input_ids": [1, 2]}\n{"input_ids": [1, 2\n': "bad.jsonl, line 2: not valid JSON",
        '{"input_ids": [1, 2]}\n{"txt": "a"}\n': "bad.jsonl, line 2: a record needs exactly one of the fields",
        '{"input_ids": [1, -2]}\n': "bad.jsonl, line 1: field 'input_ids'",
        '{"text": 5}\n': "bad.jsonl, line 1: field 'text'",
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}\n': "bad.jsonl, line 1: field 'messages\\[1\\]'",
        '{"input_ids": [1], "text": "a"}\n': "exactly one of the fields",
        '{"input_ids": [1, 2], "labels": [1]}\n': "bad.jsonl, line 1: field 'labels' must be",
        '{"input_ids": [1, 2], "labels": [1, -5]}\n': "bad.jsonl, line 1: field 'labels' must be",
        '{"text": "a", "labels": [1]}\n': "bad.jsonl, line 1: field 'labels' goes with 'input_ids'",
    }
    for text, match in cases.items():
        (tmp_path / "bad.jsonl").write_text(text)
        with pytest.raises(ValueError, match=match):
            load_records(str(tmp_path / "bad.jsonl"))
    (tmp_path / "arr.json").write_text(json.dumps([{"text": "ok"}, {"text": ""}]))
    with pytest.raises(ValueError, match="arr.json record 1: field 'text'"):
        load_records(str(tmp_path / "arr.json"))
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(ValueError, match="unsupported type"):
        load_records(str(tmp_path / "x.csv"))
    with pytest.raises(ValueError, match="neither an existing file"):
        load_records(str(tmp_path / "missing.jsonl"))


def test_parquet_directory_length_filter_and_cutoff(tmp_path):
    import datasets

    d = tmp_path / "dir"
    d.mkdir()
    datasets.Dataset.from_list([{"input_ids": list(range(10))}, {"input_ids": list(range(30))}]).to_parquet(d / "a.parquet")
    write_jsonl(d / "b.jsonl", [{"input_ids": list(range(25))}])
    ds = prepare_dataset(load_records(str(d)), None, max_length=20, min_length=12, response_only=False)
    assert sorted(len(r["input_ids"]) for r in ds) == [20, 20]  # 10 dropped, 30 and 25 cut to 20
    assert ds[0]["labels"] == ds[0]["input_ids"]
    with pytest.raises(ValueError, match="no sample is longer than min_length=40"):
        prepare_dataset(load_records(str(d)), None, max_length=50, min_length=40, response_only=False)
    with pytest.raises(ValueError, match=r"a.parquet record 1: token id 29 is outside the model's vocabulary"):
        load_records(str(d), vocab_size=16)
    with pytest.raises(ValueError, match="response_only needs chat records"):
        prepare_dataset(load_records(str(d)), None, max_length=50, min_length=1, response_only=True)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>", "hello", "world", "the", "answer", "is", "42"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<|{{ m.role }}|> {{ m.content }} <|end|> {% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    return fast


def test_text_and_chat_records_with_response_only_labels(tmp_path):
    tok = tiny_tokenizer()
    chat = {"messages": [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "the answer is 42"},
                         {"role": "user", "content": "hello"}, {"role": "assistant", "content": "42"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [chat, {"text": "hello world the answer"}])
    with pytest.raises(ValueError, match="response_only needs chat records"):
        prepare_dataset(load_records(path), tok, max_length=None, min_length=0, response_only=True)
    ds = prepare_dataset(load_records(path), tok, max_length=None, min_length=0, response_only=False)
    assert ds[1]["input_ids"] == tok("hello world the answer")["input_ids"]
    assert ds[1]["labels"] == ds[1]["input_ids"]  # plain text: every token is "response"
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    kept = tok.convert_ids_to_tokens([t for t, lab in zip(ids, labels) if lab != -100])
    assert kept == ["the", "answer", "is", "42", "<|end|>", "42", "<|end|>"]  # the assistant turns
    ds2 = prepare_dataset(load_records(write_jsonl(tmp_path / "c.jsonl", [chat])), tok, max_length=None, min_length=0,
                          response_only=True)
    assert ds2[0]["labels"] == labels
    with pytest.raises(ValueError, match="need a tokenizer"):
        prepare_dataset(load_records(path), None, max_length=None, min_length=0, response_only=False)


def test_pretokenised_labels_mark_the_response(tmp_path):
    path = write_jsonl(tmp_path / "l.jsonl", [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
                                              {"input_ids": [1, 2, 3]}])
    ds = prepare_dataset(load_records(path), None, max_length=None, min_length=0, response_only=False)
    assert ds[0]["labels"] == [-100, -100, 7, 8] and ds[1]["labels"] == [1, 2, 3]  # no labels: all tokens count
    with pytest.raises(ValueError, match="without labels"):
        prepare_dataset(load_records(path), None, max_length=None, min_length=0, response_only=True)
    ds = prepare_dataset(load_records(write_jsonl(tmp_path / "m.jsonl", [{"input_ids": [5, 6, 7, 8],
                                                                          "labels": [-100, -100, 7, 8]}])),
                         None, max_length=None, min_length=0, response_only=True)
    assert ds[0]["labels"] == [-100, -100, 7, 8]


def test_synthetic_source_marks_the_answers():
    ds = load_records("synthetic", synthetic_options={"num_examples": 3, "seed": 5, "seq_len": 64, "num_pairs": 4})
    again = load_records("synthetic", synthetic_options={"num_examples": 3, "seed": 5, "seq_len": 64, "num_pairs": 4})
    assert len(ds) == 3 and ds["input_ids"] == again["input_ids"]
    prepared = prepare_dataset(ds, None, max_length=None, min_length=0, response_only=True)
    row = prepared[0]
    answers = [i for i, lab in enumerate(row["labels"]) if lab != -100]
    assert len(answers) == 4 and all(row["labels"][i] == row["input_ids"][i] for i in answers)
    with pytest.raises(ValueError, match="synthetic options \\['pairs'\\] are unknown"):
        load_records("synthetic", synthetic_options={"pairs": 3})


def test_collator_right_pads():
    batch = DistillCollator(pad_token_id=9)([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]},
                                             {"input_ids": [4], "labels": [-100]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [-100, -100, -100]]


# ---------------------------------------------------------------------- training
def test_loss_decreases_base_is_bit_identical_and_only_memory_trains(tmp_path, tiny_model, token_data):
    trainer = build_trainer(run_config(tiny_model, token_data, tmp_path / "out", max_steps=25, save_steps=100))
    model = trainer.ahn_model
    before = {n: p.detach().clone() for n, p in model.base_model.named_parameters() if ".ahn." not in n}
    trainer.create_optimizer()
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.memory_parameters()}
    decayed = {id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(p) for p in model.memory_parameters() if p.ndim >= 2}
    trainer.train()
    kl = [r["kl"] for r in read_log(tmp_path / "out") if "kl" in r]
    assert kl[-1] < 0.6 * kl[0], kl  # the same 4 sequences every step: the memory must fit them
    for n, p in model.base_model.named_parameters():
        if ".ahn." not in n:
            assert torch.equal(p, before[n]), n
    reloaded = AutoModelForCausalLM.from_pretrained(tiny_model)
    for n, p in reloaded.named_parameters():
        assert torch.equal(p, before[n]), n


class SendSigint(TrainerCallback):
    """Sends Ctrl-C to this process at the end of a given step (the interrupt a user would send)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_saves_a_checkpoint_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path, tiny_model, token_data):
    straight = distill(run_config(tiny_model, token_data, tmp_path / "a", window="random", budgets=[16, 24],
                                  sink_choices=[0, 4]))
    out = tmp_path / "b"
    cfg = run_config(tiny_model, token_data, out, window="random", budgets=[16, 24], sink_choices=[0, 4])
    distill(cfg, callbacks=[SendSigint(step=2)])
    assert not (out / "ahn_adapter.safetensors").exists()  # not finished: no adapter yet
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-3"]  # next step ends, saves
    saved = load_file(str(out / "checkpoints" / "checkpoint-3" / "model.safetensors"))  # memory weights only
    assert {k.removeprefix("base_model.") for k in saved} == set(adapter_weights(straight))
    assert (out / "checkpoints" / "checkpoint-3" / "ahn_config.json").is_file()
    (out / "checkpoints" / "checkpoint-4").mkdir()  # a checkpoint cut short while saving is never resumed from
    distill(cfg)  # the same command again resumes
    a, b = adapter_weights(straight), adapter_weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = read_log(out)
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]  # no duplicated steps after resuming
    assert len({(r["window"], r["sinks"]) for r in log if "loss" in r}) > 1  # random windows were drawn
    assert DistillConfig.from_yaml(out / RUN_CONFIG_NAME) == cfg
    model = AHNModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)
    assert model.ahn_config.window == 32640 and model.ahn_config.sinks == 128  # random windows: the paper's eval setting


def test_flags_only_cli_run_and_adapter_loads(tmp_path, tiny_model, token_data):
    out = tmp_path / "cli"
    rc = cli(["distill", "--model", tiny_model, "--memory", "mamba2", "--data", token_data, "--window", "16",
              "--sinks", "4", "--max-steps", "2", "--output", str(out), "--min-length", "20", "--no-progress",
              "--ce-weight", "0.5", "--hidden-weight", "0.1", "--gradient-checkpointing", "--grad-accum", "2"])
    assert rc == 0
    log = read_log(out)
    assert {"kl", "ce", "hidden_mse", "loss"} <= set(log[0])
    model = AHNModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)
    assert model.ahn_config.memory == "mamba2" and model.ahn_config.window == 16 and model.ahn_config.sinks == 4
    assert any(p.abs().sum() > 0 for n, p in model.named_memory_parameters() if "o_proj" in n)  # it trained


def test_salience_run_learns_the_teachers_mass_with_checkpointing(tmp_path, tiny_model, token_data):
    """A memory with a buffer, salience writes and the deferring read-out: the salience loss is logged and
    falls, the scorer and the deferring logit train (under gradient checkpointing), and the adapter loads."""
    out = tmp_path / "sal"
    rc = cli(["distill", "--model", tiny_model, "--data", token_data, "--window", "16", "--sinks", "4",
              "--max-steps", "12", "--output", str(out), "--min-length", "20", "--no-progress", "--learning-rate", "0.05",
              "--buffer-slots", "4", "--salience-writes", "--readout", "defer", "--gradient-checkpointing"])
    assert rc == 0
    salience = [r["salience"] for r in read_log(out) if "salience" in r]
    assert len(salience) >= 2 and salience[-1] < salience[0], salience
    model = AHNModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)
    cfg = model.ahn_config
    assert (cfg.buffer_slots, cfg.salience_writes, cfg.readout) == (4, True, "defer")
    mass_weights = [p for n, p in model.named_memory_parameters() if n.endswith(".salience.mass_weight")]
    assert mass_weights and all(p.abs().sum() > 0 for p in mass_weights)  # initialised to zero: it trained
    assert any(".defer." in n for n, _ in model.named_memory_parameters())


def test_two_process_ddp_run_with_gloo(tmp_path, tiny_model, token_data):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ahn",
           "distill", "--model", tiny_model, "--data", token_data, "--window", "16", "--sinks", "4", "--max-steps", "2",
           "--batch-size", "2", "--output", str(out), "--min-length", "20", "--no-progress", "--logging-steps", "1"]
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "ahn_adapter.safetensors").exists()
    assert r.stdout.count("ahn distill: done") == 1  # rank 0 reports
    log = read_log(out)
    assert [x["step"] for x in log if "loss" in x] == [1, 2]


# Adapter of two FSDP2 processes (batch 2 each) against one process (batch 4), 6 steps at lr 3e-2: the gradients sum
# in another order (two ranks' means averaged by a reduce-scatter). Measured 2026-12-02 on this project's 2-core CPU
# (torch 2.13, gloo): max |diff| 8.8e-7 over all memory weights, the same with and without the kill and resume.
FSDP_ATOL = 1e-5


def fsdp_distill(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    """``ahn distill ARGS --fsdp 'full_shard auto_wrap'`` in two torchrun processes over gloo, FSDP2 forced on CPU
    (tests/fsdp_cpu_launch.py says how and why)."""
    launch = Path(__file__).with_name("fsdp_cpu_launch.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(launch),
           "distill", *args, "--fsdp", "full_shard auto_wrap"]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_fsdp2_two_processes_killed_and_resumed_equal_one_process(tmp_path, tiny_model, token_data):
    """Issue 27.1: ``ahn distill`` with FSDP2 in two gloo processes, one of them killed (SIGKILL) after checkpoint 3
    and the same command run again, trains the adapter that one uninterrupted process trains with the same global
    batch (a resume that lost the optimizer's state would not). Every weight is sharded (a DTensor) and only the
    memory's require gradients; checkpoints and the adapter hold full memory tensors only (the Trainer's own FSDP
    checkpoint, pytorch_model_fsdp.bin, holds the whole model: it is what the Trainer's resume loads)."""
    args = ["--model", tiny_model, "--data", token_data, "--window", "16", "--sinks", "4", "--min-length", "20",
            "--batch-size", "2", "--max-steps", "6", "--save-steps", "3", "--logging-steps", "1",
            "--learning-rate", "3e-2", "--warmup-ratio", "0", "--no-progress", "--output", str(tmp_path / "fsdp")]
    out = tmp_path / "fsdp"
    killed = fsdp_distill(args, cwd=tmp_path, AHN_TEST_KILL_AT="4")
    assert killed.returncode != 0
    assert not (out / "ahn_adapter.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-3"]
    r = fsdp_distill(args, cwd=tmp_path)  # the same command again resumes
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout and r.stdout.count("ahn distill: done") == 1  # rank 0 reports
    assert [x["step"] for x in read_log(out) if "loss" in x] == [1, 2, 3, 4, 5, 6]
    params = json.loads((out / "fsdp_params.json").read_text())
    assert {cls for _, cls, _ in params} == {"DTensor"}  # FSDP2 sharded every weight
    adapter = adapter_weights(out)
    assert {n.removeprefix("base_model.") for n, _, grad in params if grad} == set(adapter)
    reference = adapter_weights(distill(run_config(tiny_model, token_data, tmp_path / "one", batch_size=4)))
    assert adapter.keys() == reference.keys()
    diff = max((adapter[k] - reference[k]).abs().max().item() for k in adapter)
    assert diff <= FSDP_ATOL, diff
    assert any(adapter[k].abs().sum() > 0 for k in adapter if k.endswith("o_proj.weight"))  # it trained
    checkpoint = out / "checkpoints" / "checkpoint-6"
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert {k.removeprefix("base_model.") for k in saved} == set(adapter)
    assert all(saved[k].shape == adapter[k.removeprefix("base_model.")].shape for k in saved)  # full, not shards
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file()


def test_fsdp_that_cannot_run_is_refused_naming_the_fix(tmp_path, tiny_model, token_data, capsys):
    """Issue 27.1: accelerate makes a CPU multi-process run DDP whatever --fsdp says; ahn refuses it rather than train
    with another engine than asked, and leaves nothing behind. One process, unknown words, fsdp with deepspeed and
    deepspeed without its package are refused before the model loads."""
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ahn",
           "distill", "--model", tiny_model, "--data", token_data, "--window", "16", "--max-steps", "1",
           "--output", str(out), "--min-length", "20", "--no-progress", "--fsdp", "full_shard"]
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0
    assert "fsdp='full_shard': accelerate set this run up as MULTI_CPU, not FSDP" in r.stderr
    assert not out.exists()
    base = ["distill", "--model", tiny_model, "--data", token_data, "--window", "16", "--max-steps", "1",
            "--output", str(out), "--no-progress"]
    for extra, match in [(["--fsdp", "full_shard"], "shards the model across processes, and this is one: launch it "
                                                    "with torchrun"),
                         (["--fsdp", "hybrid_shard"], "unknown 'hybrid_shard'; use words of full_shard, shard_grad_op"),
                         (["--fsdp", "full_shard shard_grad_op"], "exclude each other"),
                         (["--fsdp", "full_shard", "--deepspeed", "ds.json"], "choose one of them"),
                         *([(["--deepspeed", "ds.json"], "but DeepSpeed is not installed: pip install deepspeed")]
                           if importlib.util.find_spec("deepspeed") is None else [])]:
        assert cli_exit([*base, *extra]) == 2
        assert match in capsys.readouterr().err, extra
        assert not out.exists()


def test_shipped_run_configs_are_valid():
    from importlib.resources import files

    shipped = sorted(p for p in files("ahn.configs").joinpath("distill").iterdir() if p.name.endswith(".yaml"))
    names = {p.name for p in shipped}
    for size in ("3b", "7b", "14b"):
        for mem in ("gdn", "dn", "mamba2"):
            assert f"qwen2.5-{size}-instruct-{mem}.yaml" in names
    for path in shipped:
        cfg = DistillConfig.from_yaml(path)
        cfg.check_required()
        if path.name.startswith("qwen2.5"):  # the paper's recipe
            assert (cfg.learning_rate, cfg.max_length, cfg.window, cfg.lr_scheduler) == (1e-4, 24576, "random", "cosine")
            assert cfg.batch_size * cfg.grad_accum * 8 == 128


def test_trainer_loss_equals_the_weighted_kl_of_full_logits(tmp_path):
    """compute_loss (hidden states, chunked LM head) == the KL written out on full logits, with
    the answers of synthetic recall data weighted 10x (their labels mark them)."""
    import torch.nn.functional as F

    cfg = DistillConfig(model="demo-teacher", data="synthetic", synthetic={"num_examples": 8, "seq_len": 96, "num_pairs": 4},
                        min_length=0, max_length=None, response_weight=10.0, window=16, sinks=4, batch_size=4,
                        max_steps=1, output=str(tmp_path / "o"), progress=False, loss_chunk=50)
    trainer = build_trainer(cfg)
    model = trainer.ahn_model
    for p in model.memory_parameters():  # a trained-looking memory, so that student != window-only
        torch.nn.init.normal_(p, std=0.3)
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(model, batch)
    x, labels = batch["input_ids"], batch["labels"]
    with model.attention_mode("full"), torch.no_grad():
        t = model(input_ids=x).logits
    with model.attention_mode("ahn"), torch.no_grad():
        s = model(input_ids=x, window=16, sinks=4).logits
    kl = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1)  # [B, T]
    beyond = (torch.arange(x.shape[1]) >= 16 + 4).float()
    answer_next = torch.zeros_like(kl)
    answer_next[:, :-1] = (labels[:, 1:] != -100).float()
    assert answer_next.sum() == 4 * 4  # 4 answers per sequence, nothing else labelled
    w = beyond * (1 + 9 * answer_next)
    torch.testing.assert_close(loss, (kl * w).sum() / w.sum(), rtol=1e-5, atol=1e-6)


def test_trainer_overrides_no_private_trainer_method():
    """Issue 13.1: DistillTrainer extends transformers' Trainer through public methods only."""
    from transformers import Trainer

    from ahn.distill.trainer import DistillTrainer

    private = [n for n in vars(DistillTrainer) if n.startswith("_") and not n.startswith("__") and hasattr(Trainer, n)]
    assert private == []


# ---------------------------------------------------------------------- reliability (issues 13, 14)
@pytest.fixture(scope="module")
def finished_run(tiny_model, token_data, tmp_path_factory) -> Path:
    """A finished 2-step run with its checkpoints 1 and 2; tests copy it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    distill(run_config(tiny_model, token_data, out, max_steps=2, save_steps=1))
    return out


def copy_run(finished_run, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def stop_after_step_1(out: Path) -> None:
    """Make a copy of the finished run one that stopped after step 1 (as Ctrl-C leaves it): no last checkpoint, no
    adapter."""
    import shutil

    shutil.rmtree(out / "checkpoints" / "checkpoint-2")
    (out / "ahn_adapter.safetensors").unlink()


def test_default_min_length_keeps_every_sample_with_a_position_beyond_the_window(tmp_path, tiny_model, token_data):
    """Issue 13.4a: 48-token records, window 16 + sinks 4, no --min-length: trains (not "min_length=288")."""
    out = tmp_path / "o"
    assert cli(["distill", "--model", tiny_model, "--data", token_data, "--window", "16", "--sinks", "4",
                "--max-steps", "1", "--output", str(out), "--no-progress"]) == 0
    assert (out / "ahn_adapter.safetensors").exists()
    d = write_jsonl(tmp_path / "d.jsonl", [{"input_ids": list(range(10))}, {"input_ids": list(range(30))}])
    ds = prepare_dataset(load_records(d), None, max_length=None, min_length=0, lossless=20, response_only=False)
    assert [len(r["input_ids"]) for r in ds] == [30]  # 10 tokens: nothing beyond sinks + window


def test_torn_last_line_of_train_log_is_cut_and_a_malformed_line_is_named(tmp_path, tiny_model, token_data,
                                                                          finished_run):
    """Issue 14.2: a disk-full crash leaves a torn last log line; the rerun cuts it."""
    out = copy_run(finished_run, tmp_path)
    stop_after_step_1(out)
    cfg = run_config(tiny_model, token_data, out, max_steps=2, save_steps=2)
    log = out / LOG_NAME
    lines = log.read_text()
    log.write_text(lines + '{"step": 3, "torn')
    distill(cfg)
    text = log.read_text()
    assert 'torn' not in text and [r["step"] for r in read_log(out) if "loss" in r] == [1, 2]  # cut, every line parses
    stop_after_step_1(out)
    log.write_text('{"step": 1}\nnot json\n' + lines)
    with pytest.raises(ValueError, match=r"train_log.jsonl, line 2: not valid JSON"):
        distill(cfg)


def test_rerun_with_other_training_settings_is_refused(tmp_path, tiny_model, token_data, finished_run):
    """Issue 14.4: resuming with another learning rate / window is refused, naming the keys; run-only settings
    (logging, saving, progress) may change."""
    out = copy_run(finished_run, tmp_path)
    with pytest.raises(ValueError, match=r"other settings \(window: 16 -> 8, learning_rate: 0.03 -> 0.01\); "
                                         r"rerun with the same settings.*or choose another --output"):
        distill(run_config(tiny_model, token_data, out, max_steps=2, save_steps=2, window=8, learning_rate=1e-2))
    stop_after_step_1(out)
    distill(run_config(tiny_model, token_data, out, max_steps=2, save_steps=5, logging_steps=2))  # resumes
    assert DistillConfig.from_yaml(out / RUN_CONFIG_NAME).save_steps == 5


@pytest.mark.parametrize("window,sinks", [("1000", "0"), ("8", "500")])
def test_no_position_beyond_sinks_and_window_fails_before_training(capsys, tmp_path, tiny_model, token_data,
                                                                   window, sinks):
    """Issue 14.5: data no longer than sinks + window would train nothing: an error, nothing written."""
    out = tmp_path / "o"
    argv = ["distill", "--model", tiny_model, "--data", token_data, "--window", window, "--sinks", sinks,
            "--max-steps", "2", "--output", str(out), "--no-progress"]
    assert cli_exit(argv) == 2
    err = capsys.readouterr().err
    assert f"no sample is longer than sinks + window = {int(window) + int(sinks)} tokens (the longest has 48" in err
    assert "no position lies beyond" in err and not out.exists()
    assert cli_exit(argv + ["--max-length", "100"]) == 2
    assert "max_length=100 leaves no position beyond sinks + window" in capsys.readouterr().err


def test_cli_errors_for_bad_memory_kwargs_and_unwritable_output(capsys, monkeypatch, tmp_path, tiny_model, token_data):
    """Issue 14.12: --memory-kwargs that is no JSON object, --out a file or a read-only directory, a full disk."""
    base = ["distill", "--model", tiny_model, "--data", token_data, "--window", "16", "--max-steps", "1",
            "--no-progress"]
    assert cli_exit(base + ["--out", str(tmp_path / "a"), "--memory-kwargs", "[1]"]) == 2
    assert "memory_kwargs=[1] (list) must be a mapping" in capsys.readouterr().err
    assert cli_exit(base + ["--out", str(tmp_path / "a"), "--memory-kwargs", "{"]) == 2
    assert "'{' is not valid JSON" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert cli_exit(base + ["--out", str(tmp_path / "file")]) == 2
    assert "ahn distill: error: --output" in (err := capsys.readouterr().err) and "is a file" in err
    readonly = tmp_path / "ro"
    readonly.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != readonly and real_access(p, mode))  # we may be root
    assert cli_exit(base + ["--out", str(readonly / "run")]) == 2
    assert f": {readonly} is not a writable folder" in capsys.readouterr().err
    import errno

    import ahn.distill.trainer as trainer_module

    def full_disk(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(trainer_module, "replace_file", full_disk)
    assert cli_exit(base + ["--out", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err
    assert "ahn distill: error: no space left on the device of" in err and str(tmp_path / "full") in err


def test_yaml_values_are_coerced_or_rejected_with_key_value_and_type(tmp_path):
    """Issue 14.13: PyYAML reads 1e-3 as a string; each value is checked against its field's type."""
    yml = tmp_path / "run.yaml"
    yml.write_text('learning_rate: 1e-3\nmax_steps: "2"\nbudgets: [16, 32]\nlayers: null\n')
    cfg = DistillConfig.from_yaml(yml)
    assert cfg.learning_rate == 1e-3 and cfg.max_steps == 2 and cfg.budgets == [16, 32] and cfg.layers is None
    for text, match in {"batch_size: two\n": "batch_size='two' \\(str\\) must be an int",
                        "progress: maybe\n": "progress='maybe' \\(str\\) must be true/false",
                        "max_samples: 1.5\n": "max_samples=1.5 \\(float\\) must be an int or null",
                        "budgets: [16, x]\n": "budgets=\\[16, 'x'\\] \\(list\\) must be a list of ints",
                        "synthetic: 3\n": "synthetic=3 \\(int\\) must be a mapping",
                        "memory: null\n": "memory=None \\(NoneType\\) must be a string"}.items():
        yml.write_text(text)
        with pytest.raises(ValueError, match=match):
            DistillConfig.from_yaml(yml)


def test_data_errors_name_the_file_and_blank_lines_are_skipped(tmp_path):
    """Issue 14.14: out-of-vocabulary ids, non-UTF-8, empty files and null fields name the file; blank lines
    are skipped as ahn eval skips them."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"input_ids": [1, 2]}\n\n{"input_ids": [3]}\n\n')
    assert load_records(str(path))["input_ids"] == [[1, 2], [3]]
    path.write_text('{"input_ids": [1, 100000]}\n')
    with pytest.raises(ValueError, match=r"d.jsonl, line 1: token id 100000 is outside the model's vocabulary"):
        load_records(str(path), vocab_size=VOCAB)
    path.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"d.jsonl: not UTF-8 text"):
        load_records(str(path))
    path.write_text("")
    with pytest.raises(ValueError, match=r"d.jsonl: holds no records \(the file is empty\)"):
        load_records(str(path))
    (tmp_path / "e.json").write_text("")
    with pytest.raises(ValueError, match=r"e.json: holds no records"):
        load_records(str(tmp_path / "e.json"))
    path.write_text('{"text": null}\n')
    with pytest.raises(ValueError, match=r"d.jsonl, line 1: field 'text' is null"):
        load_records(str(path))


@pytest.mark.parametrize("flag,value,match", [("--temperature", "0", "temperature=0.0 must be > 0"),
                                              ("--dataloader-workers", "-1", "dataloader_workers=-1 must be >= 0"),
                                              ("--lr-scheduler", "bogus", "bogus")])
def test_bad_settings_fail_before_anything_is_written(capsys, tmp_path, tiny_model, token_data, flag, value, match):
    """Issue 14.16: no distill_config.yaml or checkpoints/ is left behind by a bad setting."""
    out = tmp_path / "o"
    assert cli_exit(["distill", "--model", tiny_model, "--data", token_data, "--window", "16", "--max-steps", "1",
                     "--output", str(out), "--no-progress", flag, value]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, tiny_model, token_data):
    """Issue 14.17: SIGTERM (a scheduler's preemption) is treated as Ctrl-C, in a real subprocess."""
    import time

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ahn", "distill", "--model", tiny_model, "--data", token_data, "--window", "16",
           "--max-steps", "100000", "--save-steps", "100000", "--logging-steps", "1", "--output", str(out),
           "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / LOG_NAME).exists() and (out / LOG_NAME).read_text().count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "SIGTERM; saving a checkpoint" in stdout and "run the same command again to resume" in stdout
    step = max(r["step"] for r in read_log(out))
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"checkpoint-{step}"]
    assert not (out / "ahn_adapter.safetensors").exists()


def test_config_finds_shipped_configs_by_name_and_help_shows_required_flags(capsys, monkeypatch, tmp_path):
    """Issue 14.22: --config tiny / distill/tiny.yaml / configs/distill/tiny.yaml work from any directory."""
    monkeypatch.chdir(tmp_path)
    expected = DistillConfig.from_yaml("tiny")
    for name in ("distill/tiny.yaml", "ahn/configs/distill/tiny.yaml", "configs/distill/tiny.yaml", "tiny.yaml"):
        assert DistillConfig.from_yaml(name) == expected
    assert expected.model == "demo-teacher"
    with pytest.raises(ValueError, match="not a shipped config; shipped: .*qwen2.5-3b-instruct-gdn.*tiny"):
        DistillConfig.from_yaml("tiny2")
    assert cli_exit(["distill", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    for flag in ("--model MODEL", "--data DATA", "--output OUTPUT, --out OUTPUT"):
        assert text.split(flag + " ", 1)[1].split(" --", 1)[0].endswith("(required)"), flag


@pytest.mark.parametrize("flags, match", [(["--max-length", "-5"], "max_length=-5 must be >= 1"),
                                          (["--min-length", "-1"], "min_length=-1 must be >= 0")])
def test_negative_lengths_are_refused_naming_the_setting(tmp_path, capsys, flags, match):
    """Issue 14.8: a negative --max-length used to cut tokens off every sample; a negative --min-length went unchecked."""
    with pytest.raises(SystemExit) as exit_:
        cli(["distill", "--model", "m", "--data", "synthetic", "--output", str(tmp_path / "o"), *flags])
    assert exit_.value.code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_rerunning_a_finished_run_leaves_it_as_it_is(tmp_path, tiny_model, token_data, finished_run, capsys):
    """Item 1 of issue 25: rerunning a finished ``ahn distill`` resumed from its last checkpoint and trained one step
    past max_steps, changing the adapter and rotating checkpoints away. A finished run is found done: the adapter,
    checkpoints and log stay byte-identical. One whose adapter is missing (stopped after its last checkpoint) gets
    the adapter written from that checkpoint, without training."""
    out = copy_run(finished_run, tmp_path)
    files = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    capsys.readouterr()
    distill(run_config(tiny_model, token_data, out, max_steps=2, save_steps=2))
    assert "holds a finished run (checkpoint-2 of 2 steps); nothing to do" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == files
    before = adapter_weights(out)
    (out / "ahn_adapter.safetensors").unlink()
    distill(run_config(tiny_model, token_data, out, max_steps=2, save_steps=2))
    assert "adapter written to" in capsys.readouterr().out
    after = adapter_weights(out)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert read_log(out) == [json.loads(line) for line in files[out / LOG_NAME].decode().splitlines()]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]
