"""Plain helpers shared by the model-level tests (not a test module: nothing here is collected).

Tiny random models of each family (``tiny_config`` / ``tiny_qwen2_config`` / ``tiny_model``), the
byte-level model of the CLI tests, the inputs (``ids``), the incremental run, cache comparison and
the logits tolerances. Fixtures built from them live in conftest.py (``model_dirs``, ``byte_lm``);
the kernel tests share theirs in kernel_cases.py. No test module imports another (test_layout.py).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config,
)

import ahn
from ahn import AHNCache, AHNModel
from ahn.model import cache_kwargs

MEMORIES = list(ahn.available_memories())
VOCAB = 97

# ------------------------------------------------------------------------------ tolerances
# Absolute tolerance on the tiny models' logits when one function is computed two ways (one parallel forward
# vs chunked prefill + decode, other attention blocks, another decode backend). float32: SDPA over different
# key blocks agrees to ~1e-7; bfloat16: the rounding of bf16 activations.
LOGITS_ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
ATOL = LOGITS_ATOL[torch.float32]

# ------------------------------------------------------------------------------ tiny models
# Families tested against every invariant; any family whose attention goes through transformers'
# AttentionInterface should work the same way (README, "Supported models").
FAMILIES = ["qwen2", "qwen3", "llama", "mistral"]


def tiny_config(family: str = "qwen2", **overrides):
    """A tiny random config of ``family``: 2 layers, 4 query heads over 2 kv heads of 12 channels, vocab 97;
    ``overrides`` replace any field (other sizes, tokens, init)."""
    common = dict(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
    ) | overrides
    if family == "qwen3":
        return Qwen3Config(head_dim=12, **common)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(sliding_window=None, **common)
    return Qwen2Config(**common)


def tiny_qwen2_config(**overrides) -> Qwen2Config:
    return tiny_config("qwen2", **overrides)


def tiny_model(family: str = "qwen2", **overrides):
    """A random model of ``tiny_config(family, **overrides)``, initialised from torch's global generator."""
    return AutoModelForCausalLM.from_config(tiny_config(family, **overrides))


def load_base(model_dirs, family="qwen2", attn_implementation="sdpa"):
    """A fresh copy of the ``model_dirs`` fixture's model of ``family``, in eval mode."""
    return AutoModelForCausalLM.from_pretrained(model_dirs[family], attn_implementation=attn_implementation).eval()


def randomize_memory(model: AHNModel, seed: int = 0, std: float = 0.3):
    """Non-zero output projections (a fresh memory contributes nothing), so the memory path is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_memory_parameters():
            if name.endswith("o_proj.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def randomize_salience(model, seed=0):
    """Random scorer and deferring-logit weights (fresh ones are near zero), so that they matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_memory_parameters():
            if ".salience." in name or ".defer." in name:
                p.copy_(torch.randn(p.shape, generator=gen))


# ------------------------------------------------------------------------------ inputs and runs
def ids(B=1, T=60, seed=0):
    """Seeded token ids ``[B, T]`` of the tiny models' vocabulary."""
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def logits(model, x, **kw):
    with torch.no_grad():
        return model(x, use_cache=False, **kw).logits


def run_incremental(model, x, splits, **kw):
    """Prefill in uneven chunks, then decode token by token; checks the cache bound (sinks + window, plus the
    priority buffer's slots where the config has one) throughout."""
    cache = model.new_cache(**kw)
    bound = cache.sinks + max(cache.buffer_slots) + cache.window
    outs, t = [], 0
    with torch.no_grad():
        for n in splits + [1] * (x.shape[1] - sum(splits)):
            outs.append(model(x[:, t : t + n], **cache_kwargs(model, cache)).logits)
            t += n
            assert cache.kv_length <= bound
            assert cache.get_seq_length() == t
    return torch.cat(outs, 1), cache


def assert_padded_rows_generate_as_alone(model):
    """A left-padded batch of two rows generates what each row generates alone."""
    long, short = ids(1, 25, seed=5)[0], ids(1, 17, seed=6)[0]
    pad = 0
    batch = torch.stack([long, torch.cat([torch.full((8,), pad), short])])
    mask = torch.stack([torch.ones(25, dtype=torch.long), torch.cat([torch.zeros(8, dtype=torch.long), torch.ones(17, dtype=torch.long)])])
    gen = dict(max_new_tokens=12, do_sample=False, pad_token_id=pad)
    with torch.no_grad():
        both = model.generate(batch, attention_mask=mask, **gen)
        alone = [model.generate(row[None], attention_mask=torch.ones_like(row[None]), **gen)[0] for row in (long, short)]
    assert torch.equal(both[0], alone[0])
    assert torch.equal(both[1, 8:], alone[1])


# ------------------------------------------------------------------------------ caches
def layer_tensors(cache: AHNCache) -> dict:
    out = {"pad_offsets": cache.pad_offsets}
    for i, layer in enumerate(cache.layers):
        out |= {f"{i}.{k}": v for k, v in vars(layer).items() if not k.startswith("_")}
    return out


def assert_same_cache(a: AHNCache, b: AHNCache) -> None:
    ta, tb = layer_tensors(a), layer_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        if isinstance(ta[k], torch.Tensor):
            assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
        else:
            assert ta[k] == tb[k], k


# ------------------------------------------------------------------------------ the byte-level model
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The memory of the ``byte_lm`` fixture (conftest.py), which the eval and lm-eval tests pass on the command line.
BYTE_LM_WINDOW, BYTE_LM_SINKS = 32, 4


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Every byte one token (any text, Chinese included) plus three ChatML special tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"], chat_template=CHAT_TEMPLATE)
    return fast


def save_byte_lm(tmp_path_factory, ahn_config, perturb):
    """A tiny Qwen2 over ``byte_tokenizer`` (seed 3, large init: varied greedy outputs) saved with its tokenizer,
    then ``ahn_config``'s memory attached, changed in place by ``perturb(model)`` and saved as an adapter.
    Returns (model dir, adapter dir, the AHN model)."""
    tok = byte_tokenizer()
    torch.manual_seed(3)
    cfg = tiny_qwen2_config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, max_position_embeddings=4096,
                            tie_word_embeddings=False, initializer_range=0.5, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    base = AutoModelForCausalLM.from_config(cfg)
    model_dir = tmp_path_factory.mktemp("tiny")
    base.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    model = ahn.add_memory(base, ahn_config)
    perturb(model)
    adapter_dir = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(adapter_dir)
    return str(model_dir), str(adapter_dir), model
