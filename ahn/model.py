"""`add_memory` and `AHNModel`: a transformers causal LM with sinks + sliding window + memory.

ahn attaches to a model only through public extension points, so that a transformers
release that renames a forward argument or rewrites a family's attention does not break it:

* **transformers' attention registry.** ahn registers one attention function under the
  name :data:`ATTENTION` (``AttentionInterface.register``). In "window" and "ahn" modes the
  model runs with that implementation (``set_attn_implementation``): the family's own forward
  computes q / k / v after its own projections, norms and RoPE, and hands them to ahn's
  function, which attends over sinks + window and adds the memory read-out. In "full" mode
  the model runs with the implementation it was loaded with, untouched.
* **PyTorch forward hooks.** A pre-hook on the decoder (``model.get_decoder()``) turns the
  call's padding mask, cache and per-call ``window=`` / ``sinks=`` into an
  :class:`ahn.attention.AHNContext`, handed to every layer as the keyword ``ahn_context``
  (transformers passes extra keywords down to the attention function). A pre-hook on each
  attention's ``q_proj`` keeps the layer's normed hidden state, which the memory's gates read.
* **A Cache subclass.** :class:`ahn.cache.AHNCache` holds sinks, window and memory state.

No ahn file restates a transformers forward signature: the hooks find arguments by name in
the call's keywords (the cache by its type), and the attention function takes the
registry's documented ``(module, query, key, value, attention_mask, **kwargs)``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn as nn

from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.cache_utils import Cache

from ahn.adapters import read_adapter, save_adapter
from ahn.attention import ATTENTION, AHNContext, register_attention
from ahn.cache import AHNCache, LayerGeometry
from ahn.config import MODES, AHNConfig
from ahn.memory import Memory, build_memory
from ahn.memory.base import linear
from ahn.salience import SalienceRecord, SalienceScorer

# The keyword under which the decoder's forward takes its cache: "cache" from transformers 5.24,
# "past_key_values" before. Read from the forward's signature, never assumed.
CACHE_ARGUMENTS = ("cache", "past_key_values")


def cache_argument(fn) -> str:
    """The name under which ``fn`` (a model's ``forward``) takes its cache."""
    params = inspect.signature(fn).parameters
    for name in CACHE_ARGUMENTS:
        if name in params:
            return name
    raise TypeError(f"{getattr(fn, '__qualname__', fn)} takes no cache argument (looked for {CACHE_ARGUMENTS})")


def cache_kwargs(model: nn.Module, cache) -> dict:
    """``{name: cache}`` for a call of ``model`` (an AHNModel or a transformers model), under the name its
    forward takes: ``model(x, **cache_kwargs(model, cache))`` works on every supported transformers."""
    base = getattr(model, "base_model", model) if isinstance(model, AHNModel) else model
    return {cache_argument(base.forward): cache}


def output_cache(output):
    """The cache returned by a model's forward (``output.cache`` from transformers 5.24, ``past_key_values`` before)."""
    for name in CACHE_ARGUMENTS:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


class _Runtime:
    """Mutable per-model state that is not architecture: the attention mode, and what ``add_memory`` changed on the
    base model (its attention implementation, hooks, frozen parameters), so that ``remove_memory`` can undo it."""

    def __init__(self, config: AHNConfig, base_implementation: str, decoder: "_Decoder"):
        self.config = config
        self.mode = "ahn"
        self.base_implementation = base_implementation
        self.decoder = decoder
        self.hooks: list = []  # torch.utils.hooks.RemovableHandle of every hook add_memory registered
        self.requires_grad: dict = {}  # base parameter -> its requires_grad before add_memory froze it
        self.configs: dict = {}  # module -> the config object it held before add_memory gave it a private copy
        self.attached = True


class AHNModelConfig(PretrainedConfig):
    """The key under which :class:`AHNModel` is known to ``AutoModelForCausalLM`` (registered by ``add_memory``, through
    ``AutoModelForCausalLM.register``), so that ``transformers.pipeline("text-generation", model=ahn_model)`` accepts
    it without an error-level "not supported" message. ahn never builds a model from it: an AHNModel is made by
    ``add_memory`` / ``AHNModel.from_pretrained`` from a base model."""

    model_type = "ahn"


def pad_offsets_from_mask(attention_mask: Optional[torch.Tensor], batch: int, length: int, device) -> torch.Tensor:
    """Left pads per row (``[B]``) of a 2-D padding mask whose ones are contiguous per row."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, length):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(
            f"attention_mask must be a 2-D padding mask [batch, past + new tokens] = [{batch}, {length}] in "
            f"'window'/'ahn' mode, got {shape}"
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


@dataclass
class _Decoder:
    """What ahn needs of a model, found once: the decoder module, its attention modules and the cache keyword."""

    module: nn.Module
    attentions: list
    cache_argument: str
    num_layers: int


def _find_decoder(model: nn.Module) -> _Decoder:
    """Check that ``model`` is a causal LM that ahn can drive, naming what it lacks otherwise."""
    name = type(model).__name__
    if not callable(getattr(model, "get_decoder", None)) or not callable(getattr(model, "set_attn_implementation", None)):
        raise ValueError(f"{name} is not a transformers PreTrainedModel (it lacks get_decoder / set_attn_implementation)")
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"{name}'s decoder {type(decoder).__name__} has no `.layers` list of decoder layers: "
                         "ahn supports decoder-only causal LMs whose layers carry a `self_attn`")
    attentions = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        lacks = [a for a in ("q_proj", "layer_idx", "config") if not hasattr(attn, a)] if attn is not None else ["self_attn"]
        if lacks:
            raise ValueError(f"{name}: decoder layer {i} lacks {', '.join(lacks)}; ahn needs each layer's `self_attn` with "
                             "a `q_proj` input projection, a `layer_idx` and a `config`")
        if not isinstance(attn.q_proj, nn.Linear):
            raise ValueError(f"{name}: layer {i}'s self_attn.q_proj is a {type(attn.q_proj).__name__}, not nn.Linear")
        if attn.layer_idx != i:
            raise ValueError(f"{name}: layer {i}'s self_attn.layer_idx is {attn.layer_idx}")
        attentions.append(attn)
    try:
        cache_name = cache_argument(decoder.forward)
    except TypeError as e:
        raise ValueError(f"{name}: {e}") from None
    return _Decoder(decoder, attentions, cache_name, len(layers))


def _head_dim(attn: nn.Module, hf) -> int:
    head_dim = getattr(attn, "head_dim", None) or getattr(hf, "head_dim", None)
    return int(head_dim or hf.hidden_size // hf.num_attention_heads)


def build_memories(model: nn.Module, config: AHNConfig) -> dict[int, Memory]:
    """The memory modules ``add_memory`` would attach (layer index -> module), on the model's device and dtype,
    without touching ``model``: everything that can fail is checked here first."""
    if not isinstance(config, AHNConfig):
        raise TypeError(f"config must be an ahn.AHNConfig, got {type(config).__name__}")
    if isinstance(model, AHNModel) or getattr(model, "_ahn_runtime", None) is not None:
        raise ValueError("this model already has an AHN memory; load adapters into a fresh base model")
    decoder = _find_decoder(model)
    hf = model.config
    memories = {}
    for i in config.memory_layers(decoder.num_layers):
        attn = decoder.attentions[i]
        ref = attn.q_proj.weight
        mem = build_memory(
            config.memory, hidden_size=hf.hidden_size, num_heads=hf.num_attention_heads, head_dim=_head_dim(attn, hf),
            use_qk_l2norm=config.use_qk_l2norm, options=config.memory_kwargs,
        )
        if config.uses_salience:
            mem.salience = SalienceScorer(hf.hidden_size, getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
                                          mass=config.salience_mass)
            mem.salience_gates_writes = config.salience_writes
        if config.readout == "defer":
            mem.defer = linear(hf.hidden_size, hf.num_attention_heads, bias=True)
        memories[i] = mem.to(device=ref.device, dtype=ref.dtype)
    return memories


def buffer_slots(config: AHNConfig, num_layers: int, mode: str) -> tuple[int, ...]:
    """Priority-buffer slots per layer of a cache in ``mode``: ``config.buffer_slots`` on memory layers in "ahn"."""
    layers = set(config.memory_layers(num_layers)) if mode == "ahn" else set()
    return tuple(config.buffer_slots if i in layers else 0 for i in range(num_layers))


def memory_parameter_names(model: nn.Module, memories: dict[int, Memory]) -> dict[str, nn.Parameter]:
    """The parameters of ``memories`` under the names they take once attached to ``model``
    (``<decoder>.layers.<i>.self_attn.ahn.<param>``, e.g. ``model.layers.0.self_attn.ahn.A_log``)."""
    decoder = _find_decoder(model).module
    prefix = next(name for name, m in model.named_modules() if m is decoder)
    prefix = f"{prefix}." if prefix else ""
    return {f"{prefix}layers.{i}.self_attn.ahn.{n}": p for i, mem in memories.items() for n, p in mem.named_parameters()}


def add_memory(model: nn.Module, config: AHNConfig, memories: Optional[dict[int, Memory]] = None) -> "AHNModel":
    """Give a transformers causal LM sinks + sliding-window attention and a memory per layer.

    ``model`` is modified in place (PEFT-like: its parameters keep their names and are frozen;
    each memory lives at ``<decoder>.layers.<i>.self_attn.ahn``) and wrapped in an
    :class:`AHNModel`, whose memory parameters are the only trainable ones. Any family whose
    attention dispatches through transformers' ``AttentionInterface`` works; on error the
    model is left as it was. ``memories``: modules from :func:`build_memories` (already checked).
    """
    if memories is None:
        memories = build_memories(model, config)
    decoder = _find_decoder(model)
    register_attention()
    AutoModelForCausalLM.register(AHNModelConfig, AHNModel, exist_ok=True)  # idempotent (see AHNModelConfig)
    shared_configs = _own_configs(model)
    base_implementation = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION)
    if model.config._attn_implementation != ATTENTION:
        model.set_attn_implementation(base_implementation)
        _restore_configs(shared_configs)
        raise ValueError(
            f"{type(model).__name__} does not dispatch its attention through transformers' AttentionInterface "
            "(set_attn_implementation has no effect on it), which ahn attaches to"
        )
    model.set_attn_implementation(base_implementation)

    runtime = _Runtime(config, base_implementation, decoder)
    runtime.configs = shared_configs
    for p in model.parameters():
        runtime.requires_grad[p] = p.requires_grad
        p.requires_grad_(False)
    hooks = runtime.hooks
    hooks.append(decoder.module.register_forward_pre_hook(_decoder_pre_hook(runtime, decoder), with_kwargs=True))
    for i, attn in enumerate(decoder.attentions):
        attn.ahn = memories.get(i)  # a registered submodule (None: this layer has no memory)
        hooks.append(attn.q_proj.register_forward_pre_hook(_keep_hidden_state(attn)))
        hooks.append(attn.register_forward_pre_hook(_check_dispatch(runtime), with_kwargs=True))
    model._ahn_runtime = runtime
    wrapped = AHNModel(model, config, runtime)
    wrapped._set_mode("ahn")
    return wrapped


def _own_configs(model: nn.Module) -> dict:
    """Give ``model`` private copies of its config objects (every submodule that holds one gets the copy) and return
    ``{module: its original config}``. Selecting ahn's attention writes the config; two models built from one config
    object share it, and attaching a memory to one must not change the other."""
    memo: dict = {}
    copy.deepcopy(model.config, memo)
    originals = {}
    for module in model.modules():
        config = module.__dict__.get("config")
        if isinstance(config, PretrainedConfig) and isinstance(memo.get(id(config)), PretrainedConfig):
            originals[module] = config
            module.config = memo[id(config)]
    return originals


def _restore_configs(originals: dict) -> None:
    for module, config in originals.items():
        module.config = config


def _keep_hidden_state(attn: nn.Module):
    """Pre-hook of ``q_proj``: its input is the layer's normed hidden state, which the memory reads."""

    def hook(module, args):
        attn.__dict__["_ahn_hidden"] = args[0]  # a plain attribute (not nn.Module.__setattr__: per layer per token)

    return hook


def _check_dispatch(runtime: _Runtime):
    """Pre-hook of each attention: its call and the model's attention implementation must agree on the mode.

    They disagree when the mode changed between a forward and its gradient-checkpointing
    recomputation (the backward), which would otherwise silently recompute another attention.
    """

    def hook(module, args, kwargs):
        # runtime.mode moves with the model's attention implementation (AHNModel._set_mode sets both)
        if (kwargs.get("ahn_context") is not None) != (runtime.mode != "full"):
            raise RuntimeError(
                "the attention mode changed between a forward and its recomputation (gradient checkpointing recomputes "
                "the forward during backward): call backward() inside the same model.attention_mode(...) as the forward"
            )

    return hook


def _decoder_pre_hook(runtime: _Runtime, decoder: _Decoder):
    """Forward pre-hook of the decoder: build the AHN context of this call (window/ahn modes)."""
    names = [n for n, p in inspect.signature(decoder.module.forward).parameters.items()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    cache_name = decoder.cache_argument

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        for name, value in zip(names, args):  # positional arguments by the forward's own names
            kwargs[name] = value
        window, sinks = kwargs.pop("window", None), kwargs.pop("sinks", None)
        record = kwargs.pop("salience_record", None)
        for other in CACHE_ARGUMENTS:  # a cache passed under the other (deprecated) name
            if other != cache_name and other in kwargs:
                if kwargs.get(cache_name) is not None:
                    raise TypeError(f"pass the cache once, as {cache_name}=")
                kwargs[cache_name] = kwargs.pop(other)
        cache = kwargs.get(cache_name)
        mode, cfg = runtime.mode, runtime.config
        if mode == "full":
            if window is not None or sinks is not None or record is not None:
                raise ValueError("window=, sinks= and salience_record= apply in 'window' and 'ahn' modes, not in "
                                 "attention_mode('full')")
            if isinstance(cache, AHNCache):
                raise ValueError("an AHNCache cannot be used in attention_mode('full'); pass a DynamicCache or none")
            return (), kwargs
        W = cfg.window if window is None else window
        S = cfg.sinks if sinks is None else sinks
        if not isinstance(W, int) or W < 1 or not isinstance(S, int) or S < 0:
            raise ValueError(f"window={W!r} must be an int >= 1 and sinks={S!r} an int >= 0")
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None:
            raise ValueError("pass input_ids or inputs_embeds")
        B, T = x.shape[:2]
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = bool(getattr(module.config, "use_cache", False))
        if cache is not None and not isinstance(cache, AHNCache):
            if isinstance(cache, Cache) and cache.get_seq_length() == 0:
                cache = None  # an empty default cache (e.g. made by generate): use ours
            else:
                raise TypeError(
                    f"the cache is a {type(cache).__name__}; in '{mode}' mode pass an ahn.AHNCache "
                    "(model.new_cache()) or None"
                )
        if record is not None and not isinstance(record, SalienceRecord):
            raise TypeError(f"salience_record must be an ahn.salience.SalienceRecord, got {type(record).__name__}")
        buffers = buffer_slots(cfg, decoder.num_layers, mode)
        if cache is None and use_cache:
            cache = AHNCache(decoder.num_layers, W, S, mode, buffers)
        if cache is not None:
            cache.check_call(W, S, mode, B, buffers)
        start = cache.get_seq_length() if cache is not None else 0
        if cache is not None and cache.pad_offsets is not None:
            P = cache.pad_offsets
        else:
            P = pad_offsets_from_mask(kwargs.get("attention_mask"), B, start + T, x.device)
            if cache is not None:
                cache.pad_offsets = P
        if kwargs.get("position_ids") is None:
            position_ids = (start + torch.arange(T, device=x.device)).view(1, T) - P.view(B, 1)
            kwargs["position_ids"] = position_ids.clamp(min=0)
        kwargs[cache_name] = cache
        kwargs["use_cache"] = use_cache
        kwargs["ahn_context"] = AHNContext(
            mode=mode, window=W, sinks=S, pad_offsets=P, start=start, cache=cache,
            attention_block=cfg.block_for(W), backend=cfg.backend, buffer_slots=cfg.buffer_slots, record=record,
            mass_stride=cfg.mass_stride_for(W),
        )
        return (), kwargs

    return hook


class AHNModel(nn.Module):
    """A transformers causal LM with an AHN memory; behaves like the wrapped model.

    Calls (``forward``, ``generate``, attribute access) go to the base model. Extra forward
    keywords ``window=`` and ``sinks=`` override the config's for one call (distillation
    draws them per batch). Use :meth:`attention_mode` to run the exact base model
    (``"full"``) or sinks + window without memory (``"window"``).

    The mode belongs to the model, not to a thread (it selects the model's attention
    implementation): two threads that need different modes at the same time need two models.
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

    # ------------------------------------------------------------------ detaching
    def remove_memory(self) -> nn.Module:
        """Detach the memory and return the base model exactly as it was before ``add_memory``: its attention
        implementation, no ahn hooks, no ``ahn`` submodules, every parameter's ``requires_grad`` as it was. This
        AHNModel cannot run afterwards. ``with ahn.add_memory(base, config) as model:`` detaches on leaving."""
        runtime = self._runtime
        if not runtime.attached:
            raise RuntimeError("the memory was already removed from this model")
        base = self.base_model
        base.set_attn_implementation(runtime.base_implementation)
        _restore_configs(runtime.configs)
        for handle in runtime.hooks:
            handle.remove()
        for attn in runtime.decoder.attentions:
            delattr(attn, "ahn")
            attn.__dict__.pop("_ahn_hidden", None)
        for p, flag in runtime.requires_grad.items():
            p.requires_grad_(flag)
        del base._ahn_runtime
        runtime.attached, runtime.hooks, runtime.requires_grad, runtime.configs = False, [], {}, {}
        return base

    def __enter__(self) -> "AHNModel":
        return self

    def __exit__(self, *exc) -> None:
        if self._runtime.attached:
            self.remove_memory()

    # ------------------------------------------------------------------ running
    def forward(self, *args, **kwargs):
        if not self._runtime.attached:
            raise RuntimeError("this AHNModel's memory was removed (remove_memory()); run the base model it returned")
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """`generate` of the base model; in "window"/"ahn" mode with a fresh :class:`AHNCache`."""
        name = cache_argument(self.base_model.forward)  # generate hands its model kwargs to forward
        given = [n for n in CACHE_ARGUMENTS if kwargs.get(n) is not None]
        if given and given[0] != name:
            kwargs[name] = kwargs.pop(given[0])
        if self.mode != "full" and kwargs.get(name) is None:
            kwargs[name] = self.new_cache()
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
            buffer_slots(cfg, self.base_model.config.num_hidden_layers, self.mode),
            model=self,
        )

    def cache_geometry(self) -> list[LayerGeometry]:
        """Per decoder layer, what its cache layer holds in the current mode (checked when a saved state loads)."""
        hf = self.base_model.config
        out = []
        for attn in self._runtime.decoder.attentions:
            memory = attn.ahn if self.mode == "ahn" else None
            out.append(LayerGeometry(
                kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
                head_dim=_head_dim(attn, hf), heads=hf.num_attention_heads,
                gate_channels=memory.gate_channels if memory is not None else None,
                salience=memory is not None and memory.salience is not None, dtype=attn.q_proj.weight.dtype,
            ))
        return out

    @property
    def mode(self) -> str:
        return self._runtime.mode

    def _set_mode(self, mode: str) -> None:
        runtime = self._runtime
        runtime.mode = mode
        self.base_model.set_attn_implementation(runtime.base_implementation if mode == "full" else ATTENTION)

    @contextlib.contextmanager
    def attention_mode(self, mode: str) -> Iterator["AHNModel"]:
        """Temporarily run as ``"full"`` (the base model), ``"window"`` (no memory) or ``"ahn"``.

        The mode is the model's (see the class note on threads); with gradient checkpointing,
        call ``backward()`` inside the same mode as the forward.
        """
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} must be one of {MODES}")
        previous = self._runtime.mode
        self._set_mode(mode)
        try:
            yield self
        finally:
            self._set_mode(previous)

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
        """Write the memory weights (safetensors) and ``ahn_config.json`` to ``path``, atomically as a whole."""
        save_adapter(self, path)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, path, **overrides) -> "AHNModel":
        """Attach a saved adapter (ahn's format or the official AHN release's) to ``base_model``.

        ``overrides`` replace AHNConfig fields, e.g. ``window=8064`` for a shorter context.
        Everything is checked before ``base_model`` is touched: on any error it is left as it was.
        """
        config, state = read_adapter(path, **overrides)
        memories = build_memories(base_model, config)
        expected = memory_parameter_names(base_model, memories)
        unknown = sorted(set(state) - set(expected))
        if unknown:
            raise ValueError(
                f"adapter {path} has key {unknown[0]!r} which this model does not have: the adapter was made for another "
                f"base model or memory layout (memory={config.memory!r}, layers={config.layers})"
            )
        for name, param in expected.items():  # in the model's order: the first offending layer is named
            if name in state and tuple(state[name].shape) != tuple(param.shape):
                raise ValueError(
                    f"adapter {path}: {name!r} has shape {tuple(state[name].shape)} but the model expects "
                    f"{tuple(param.shape)}: the adapter was made for another base model"
                )
        missing = [n for n in expected if n not in state]
        if missing:
            raise ValueError(f"adapter {path} lacks {len(missing)} memory weights, first {missing[0]!r}")
        with torch.no_grad():
            for name, tensor in state.items():
                expected[name].copy_(tensor)
        return add_memory(base_model, config, memories)
