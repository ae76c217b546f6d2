"""`add_memory` and `AHNModel`: a transformers causal LM with sinks + sliding window + memory.

`add_memory(base, config)` modifies ``base`` in place (PEFT-like): every decoder layer's
attention becomes its family's hybrid subclass (parameters keep their names) and gets a
memory module at ``model.layers.<i>.self_attn.ahn``; base parameters are frozen; the inner
model's forward is wrapped so that, in "window" and "ahn" modes, it builds an
:class:`ahn.attention.AHNContext` and an :class:`ahn.cache.AHNCache`. `generate`, the
Trainer and gradient checkpointing go through the base model unchanged.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator, Optional

import torch
import torch.nn as nn
from transformers.cache_utils import Cache

from ahn.attention import MODES, AHNContext
from ahn.cache import AHNCache
from ahn.config import AHNConfig
from ahn.memory import build_memory
from ahn.models import attention_classes, supported_model_types


class _Runtime:
    """Mutable per-model state that is not architecture: the attention mode."""

    def __init__(self, config: AHNConfig):
        self.config = config
        self.mode = "ahn"


def pad_offsets_from_mask(attention_mask: Optional[torch.Tensor], batch: int, length: int, device) -> torch.Tensor:
    """Left pads per row (``[B]``) of a 2-D padding mask whose ones are contiguous per row."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, length):
        raise ValueError(
            f"attention_mask must be a 2-D padding mask [batch, past + new tokens] = [{batch}, {length}] in "
            f"'window'/'ahn' mode, got shape {tuple(attention_mask.shape)}"
        )
    m = attention_mask.to(torch.bool)
    pads = (~m).long().cumprod(-1).sum(-1)  # leading zeros
    n = m.long().sum(-1)
    pos = torch.arange(length, device=m.device).view(1, -1)
    if not torch.equal(m, (pos >= pads.view(-1, 1)) & (pos < (pads + n).view(-1, 1))):
        raise ValueError(
            "attention_mask rows must be left- or right-padded (the ones of each row contiguous). Note that "
            "generate() without attention_mask infers one from pad_token_id, which masks every occurrence of that "
            "token: pass attention_mask explicitly"
        )
    return pads.to(device)


def _wrap_inner_forward(inner: nn.Module, runtime: _Runtime, num_layers: int) -> None:
    """Route the inner model's forward through the AHN context in "window" / "ahn" modes."""
    original = inner.forward

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, window=None, sinks=None, **kwargs):
        mode, cfg = runtime.mode, runtime.config
        if mode == "full":
            if window is not None or sinks is not None:
                raise ValueError("window= and sinks= apply in 'window' and 'ahn' modes, not in attention_mode('full')")
            if isinstance(past_key_values, AHNCache):
                raise ValueError("an AHNCache cannot be used in attention_mode('full'); pass a DynamicCache or none")
            return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        W = cfg.window if window is None else window
        S = cfg.sinks if sinks is None else sinks
        if not isinstance(W, int) or W < 1 or not isinstance(S, int) or S < 0:
            raise ValueError(f"window={W!r} must be an int >= 1 and sinks={S!r} an int >= 0")
        x = input_ids if input_ids is not None else inputs_embeds
        if x is None:
            raise ValueError("pass input_ids or inputs_embeds")
        B, T = x.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if past_key_values is not None and not isinstance(past_key_values, AHNCache):
            if isinstance(past_key_values, Cache) and past_key_values.get_seq_length() == 0:
                past_key_values = None  # an empty default cache (e.g. made by generate): use ours
            else:
                raise TypeError(
                    f"past_key_values is a {type(past_key_values).__name__}; in '{mode}' mode pass an ahn.AHNCache "
                    "(model.new_cache()) or None"
                )
        cache = past_key_values
        if cache is None and use_cache:
            cache = AHNCache(num_layers, W, S, mode)
        if cache is not None and (cache.window, cache.sinks, cache.mode) != (W, S, mode):
            raise ValueError(
                f"this AHNCache was made for window={cache.window}, sinks={cache.sinks}, mode={cache.mode!r}, "
                f"but the call uses window={W}, sinks={S}, mode={mode!r}; start a new cache"
            )
        start = cache.get_seq_length() if cache is not None else 0
        if cache is not None and cache.pad_offsets is not None:
            P = cache.pad_offsets
        else:
            P = pad_offsets_from_mask(attention_mask, B, start + T, x.device)
            if cache is not None:
                cache.pad_offsets = P
        if position_ids is None:
            position_ids = (start + torch.arange(T, device=x.device)).view(1, T) - P.view(B, 1)
            position_ids = position_ids.clamp(min=0)
        ctx = AHNContext(mode=mode, window=W, sinks=S, pad_offsets=P, start=start, cache=cache,
                         attention_block=cfg.block_for(W), backend=cfg.backend)
        return original(input_ids=input_ids, attention_mask={"full_attention": ctx, "sliding_attention": ctx},
                        position_ids=position_ids, past_key_values=cache, inputs_embeds=inputs_embeds,
                        use_cache=use_cache, **kwargs)

    inner.forward = types.MethodType(forward, inner)


def _decoder(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise ValueError(
            f"{type(model).__name__} is not a supported causal LM: ahn needs a *ForCausalLM with .model.layers "
            f"(supported model types: {supported_model_types()})"
        )
    return inner


def add_memory(model: nn.Module, config: AHNConfig) -> "AHNModel":
    """Give a transformers causal LM sinks + sliding-window attention and a memory per layer.

    ``model`` is modified in place (its parameters keep their names and are frozen) and
    wrapped in an :class:`AHNModel`, whose memory parameters are the only trainable ones.
    """
    if not isinstance(config, AHNConfig):
        raise TypeError(f"config must be an ahn.AHNConfig, got {type(config).__name__}")
    if isinstance(model, AHNModel):
        raise ValueError("this model already has an AHN memory; load adapters into a fresh base model")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    base_cls, hybrid_cls = attention_classes(model_type)
    inner = _decoder(model)
    if getattr(inner, "_ahn_runtime", None) is not None:
        raise ValueError("this base model already has an AHN memory; load adapters into a fresh base model")
    hf = model.config
    layers_with_memory = set(config.memory_layers(hf.num_hidden_layers))
    for p in model.parameters():
        p.requires_grad_(False)
    for i, layer in enumerate(inner.layers):
        attn = layer.self_attn
        if type(attn) is not base_cls:
            raise ValueError(f"layer {i} attention is {type(attn).__name__}, expected {base_cls.__name__}")
        attn.__class__ = hybrid_cls
        if i in layers_with_memory:
            ref = attn.q_proj.weight
            mem = build_memory(
                config.memory, hidden_size=hf.hidden_size, num_heads=hf.num_attention_heads, head_dim=attn.head_dim,
                use_qk_l2norm=config.use_qk_l2norm, options=config.memory_kwargs,
            )
            attn.ahn = mem.to(device=ref.device, dtype=ref.dtype)
        else:
            attn.ahn = None
    runtime = _Runtime(config)
    inner._ahn_runtime = runtime
    _wrap_inner_forward(inner, runtime, hf.num_hidden_layers)
    return AHNModel(model, config, runtime)


class AHNModel(nn.Module):
    """A transformers causal LM with an AHN memory; behaves like the wrapped model.

    Calls (``forward``, ``generate``, attribute access) go to the base model. Extra forward
    keywords ``window=`` and ``sinks=`` override the config's for one call (distillation
    draws them per batch). Use :meth:`attention_mode` to run the exact base model
    (``"full"``) or sinks + window without memory (``"window"``).
    """

    def __init__(self, base_model: nn.Module, config: AHNConfig, runtime: _Runtime):
        super().__init__()
        self.base_model = base_model
        self.ahn_config = config
        self._runtime = runtime

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model, name)

    # ------------------------------------------------------------------ running
    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """`generate` of the base model; in "window"/"ahn" mode with a fresh :class:`AHNCache`."""
        if self.mode != "full" and kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = self.new_cache()
        return self.base_model.generate(*args, **kwargs)

    def new_cache(self, window: Optional[int] = None, sinks: Optional[int] = None) -> AHNCache:
        """An empty :class:`AHNCache` for the current mode (window/sinks default to the config's)."""
        if self.mode == "full":
            raise ValueError("attention_mode('full') uses the base model's own cache, not an AHNCache")
        cfg = self.ahn_config
        return AHNCache(
            self.base_model.config.num_hidden_layers,
            cfg.window if window is None else window,
            cfg.sinks if sinks is None else sinks,
            self.mode,
        )

    @property
    def mode(self) -> str:
        return self._runtime.mode

    @contextlib.contextmanager
    def attention_mode(self, mode: str) -> Iterator["AHNModel"]:
        """Temporarily run as ``"full"`` (the base model), ``"window"`` (no memory) or ``"ahn"``."""
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} must be one of {MODES}")
        previous = self._runtime.mode
        self._runtime.mode = mode
        try:
            yield self
        finally:
            self._runtime.mode = previous

    # ------------------------------------------------------------------ parameters
    def named_memory_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Memory parameters with their names in the base model (``model.layers.<i>.self_attn.ahn.*``)."""
        for name, p in self.base_model.named_parameters():
            if ".ahn." in name:
                yield name, p

    def memory_parameters(self) -> Iterator[nn.Parameter]:
        for _, p in self.named_memory_parameters():
            yield p

    def memory_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_memory_parameters()}

    def print_trainable_parameters(self) -> None:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------ adapters
    def save_pretrained(self, path) -> None:
        """Write the memory weights (safetensors) and ``ahn_config.json`` to ``path``, atomically."""
        from ahn.adapters import save_adapter

        save_adapter(self, path)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, path, **overrides) -> "AHNModel":
        """Attach a saved adapter (ahn's format or the official AHN release's) to ``base_model``.

        ``overrides`` replace AHNConfig fields, e.g. ``window=8064`` for a shorter context.
        """
        from ahn.adapters import load_adapter

        return load_adapter(base_model, path, **overrides)
