"""Per-layer activations and output gradients from ONE batched forward and backward.

The `torch.func` route (`per_sample._PerSample`) differentiates each sample separately
under vmap: always correct, but every op pays vmap's batching overhead. The routes built
on this module run the model once on the batch, record each trainable layer's input
activation `a` and, from one `autograd.grad` call w.r.t. the layer OUTPUTS (so no summed
weight gradient is ever computed), its output gradient `g`. What is done with (a, g) is
the route's business:

- `HookPerSample` (method `hooks`) materialises per-sample gradients of every layer;
- `ghost.MixedClipper` (methods `mixed` / `ghost`) computes per-record gradient NORMS
  without materialising them where that is cheaper, then the clipped sum by book-keeping.

The per-layer rules (per sample b, tokens t):

- Linear:     dW_b = sum_t g_bt a_bt^T,  db_b = sum_t g_bt
- LayerNorm:  dw_b = sum_t g_bt * xhat_bt,  db_b = sum_t g_bt (xhat: the normalised input,
  rebuilt from the mean / rstd that the forward already saved for its own backward)
- Conv2d used as a patchifier (stride == kernel, no padding): a Linear on unfolded patches
- timm WindowAttention's `relative_position_bias_table`: the bias is handed to attention
  expanded to one copy per window, (B * windows, heads, N, N); the gradient of that copy
  is summed over each sample's windows and scattered into the table rows.

Why this is valid for Swin although attention folds windows into the batch dimension:
timm's window partition is sample-major (row b * windows + w), so a layer's activation
(B * windows, N, C) reshapes to (B, windows * N, C) with each sample's tokens together.
A model opts in by setting `dp_sample_major = True` (SwinClassifier does); any trainable
parameter outside the supported layers makes `supports()` false and callers use vmap.

A model may also offer `dp_split() -> (features_fn, head, prefix) | None` (SwinClassifier
does with a frozen backbone): the frozen features are then computed once per batch under
`torch.no_grad()` and only the trainable suffix runs with hooks.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mammodp.privacy.per_sample import (
    LOW_PRECISION,
    LossFn,
    per_sample_loss_fn,
    tf32_products,
    trainable_named_parameters,
)


def _window_attention_cls():
    try:
        from timm.models.swin_transformer import WindowAttention
    except ImportError:  # timm absent: no Swin, nothing to support
        return None
    return WindowAttention


def _layer_kind(module: nn.Module) -> str | None:
    """Which rule computes this module's per-sample gradients (None: unsupported)."""
    wa = _window_attention_cls()
    if wa is not None and isinstance(module, wa):
        return "window_attention"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return "layer_norm"
    if (isinstance(module, nn.Conv2d) and tuple(module.stride) == tuple(module.kernel_size)
            and tuple(module.padding) == (0, 0) and tuple(module.dilation) == (1, 1) and module.groups == 1
            and module.padding_mode == "zeros"):
        return "patchify"
    return None


def _shadowable(module: nn.Module, names: tuple[str, ...]) -> bool:
    """The recorder can shadow these methods of `module` for a pass: each is a plain function
    of its class (an instance attribute then takes precedence; a property would not), and
    the module is called through nn.Module's own `__call__` (which calls `forward`)."""
    cls = type(module)
    if cls.__call__ is not nn.Module.__call__:
        return False
    return all(isinstance(inspect.getattr_static(cls, name, None), types.FunctionType) for name in names)


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """A layer call's input: the first positional argument, or the first one passed by name."""
    return args[0] if args else next(iter(kwargs.values()))


def _stock_matmul(module: nn.Module) -> bool:
    """A Linear / Conv2d whose forward is torch's own (one `F.linear` / convolution under the
    caller's autocast): `_cast_input` may then cast its input as autocast would. A subclass
    with its own forward (one that switches autocast off, or upcasts) is left alone."""
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward
    if isinstance(module, nn.Conv2d):
        return type(module).forward is nn.Conv2d.forward and type(module)._conv_forward is nn.Conv2d._conv_forward
    return False


def _cast_input(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Where autocast is on at the call, the float32 input of a Linear / patchifier with
    torch's own forward (`_stock_matmul`) cast to autocast's dtype before the call, as
    autocast would cast it inside the layer (the same rounding, the same graph): the layer
    then saves this very tensor for its backward, and the recorder holds that one, not the
    float32 original beside autocast's copy. On CUDA (LayerNorms autocast to float32) those
    are the LayerNorm outputs feeding the attention and MLP layers, and the image: the DP
    step's peak memory at Swin-T 224 under bf16 (CPU with CUDA's LayerNorm policy,
    `bench/dp_overhead.py --layernorm-fp32`) 1.44x -> 1.29x plain's at batch 4, 1.28x ->
    1.10x at batch 16."""
    inp = _first_input(args, kwargs)
    if inp.dtype != torch.float32:
        return args, kwargs
    kind = inp.device.type
    if not torch.amp.is_autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return args, kwargs
    low = inp.to(torch.get_autocast_dtype(kind))
    if args:
        return (low, *args[1:]), kwargs
    return args, {**kwargs, next(iter(kwargs)): low}


def supports(model: nn.Module) -> bool:
    """True when every trainable parameter sits in a supported layer of an opted-in model."""
    if not getattr(model, "dp_sample_major", False):
        return False
    for _, module in model.named_modules():
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        kind = _layer_kind(module)
        if kind is None:
            return False
        if kind == "window_attention" and own != ["relative_position_bias_table"]:
            return False
        if not _shadowable(module, ("forward", "_get_rel_pos_bias") if kind == "window_attention" else ("forward",)):
            return False
    return True


def frozen_split(model: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, nn.Module, str]:
    """(frozen feature function or None, module that holds every trainable parameter, its prefix)."""
    split = model.dp_split() if callable(getattr(model, "dp_split", None)) else None
    if split is not None:
        features, module, prefix = split
        local = dict(module.named_parameters())
        trainable = trainable_named_parameters(model)
        if all(n.startswith(prefix) and n[len(prefix):] in local for n in trainable):
            return features, module, prefix
    return None, model, ""


def frozen_features(features: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, autocast) -> torch.Tensor:
    """Features of a frozen prefix, computed under `torch.inference_mode()` (no autograd, no
    version counters or view tracking: cheaper than no_grad) and cloned out of it, so that the
    trainable suffix can save them for its backward."""
    with torch.inference_mode(), autocast:
        out = features(x)
    return out.clone()


@dataclass(slots=True)
class LayerCall:
    """One call of one trainable layer in a recorded forward.

    Attributes:
        key: parameter-name prefix of the layer in the full model (e.g. `head.0.`).
        module, kind, own: the layer, its rule (`_layer_kind`) and its trainable parameter names.
        a: the input activation (None for window attention).
        ln_stats: (mean, rstd) saved by a LayerNorm's forward, when available.
    """

    key: str
    module: nn.Module
    kind: str
    own: list[str]
    a: torch.Tensor | None
    ln_stats: tuple[torch.Tensor, torch.Tensor] | None = None


class Recorder:
    """Runs a forward and one backward, recording the trainable layers of `module`.

    `run(x, y, sink)` calls `sink(call, g)` (with grad mode off) for every trainable
    layer call as soon as backward produces that call's output gradient `g`, and returns
    the per-sample losses. The shadowed forwards and the autograd hooks live only for the
    duration of the call.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, autocast_dtype: torch.dtype | None):
        if not supports(model):
            raise ValueError("model not supported by the hook-based per-sample gradients")
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.features, self.module, self.prefix = frozen_split(model)
        self.layers: list[tuple[str, nn.Module, str, list[str]]] = []  # (key, module, kind, own params)
        for name, module in self.module.named_modules():
            own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if own:
                self.layers.append((self.prefix + (f"{name}." if name else ""), module, _layer_kind(module), own))
        self.names = list(trainable_named_parameters(model))
        self._per_sample_loss = per_sample_loss_fn(loss_fn)

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The samples, or their frozen features computed once, without autograd."""
        if self.features is None:
            return x
        return frozen_features(self.features, x, self._autocast(x.device))

    @contextlib.contextmanager
    def _hooks(self, state: dict):
        """Record every trainable layer call of one pass into `state`: each layer's `forward`
        is shadowed, for the pass, by an instance attribute that calls the original and
        records its input and output (see `record`), and each window attention's bias lookup
        by one that makes the per-window copy. No nn.Module hooks: a module without hooks takes
        `Module.__call__`'s fast path, and forward hooks and pre-hooks cost ~0.3 ms a step at
        swin_micro (39 layer calls); also, a user's forward hook that rewrote a layer's output
        would otherwise change the gradient recorded as that layer's."""
        patched: list[tuple[nn.Module, str, object]] = []
        calls = state["calls"]

        # The hooks reach their call and the sink only through `state`, which `run` empties
        # afterwards (see there): they capture nothing else that holds tensors. One function
        # for all calls, bound per call with functools.partial (C): no closures a layer call.
        def fire(i: int, release: bool, g):
            # Let go of the call (its input activation, LayerNorm stats) once the sink has it:
            # held to the end of backward, every layer input outlived autograd's own copy, so
            # the next backward buffers (gelu_backward's output, ...) were fresh, cold memory
            # instead of the block just freed (swin_micro: peak memory 1.08x -> 1.02x plain,
            # ~0.4 ms a step). A sink that needs them later keeps them itself.
            call = calls[i]
            calls[i] = None
            state["sink"](call, g)  # backward without create_graph: grad mode off, no graph
            del call
            state["fired"] += 1
            if release:
                # The captured gradient of a backward input (a per-window bias copy, as large
                # as the attention map) would stay alive until backward returns: replace it by
                # a zero-strided view of one number, so that its storage is freed (and reused
                # by the allocator) as soon as the sink has consumed it.
                return g.new_zeros(()).expand(g.shape)
            return None

        def fire_pre(i: int, nr: int, grads):
            fire(i, False, grads[nr])

        def record(key: str, mod: nn.Module, kind: str, own: list[str], cast: bool, original, *args, **kwargs):
            if cast:
                args, kwargs = _cast_input(args, kwargs)
            output = original(*args, **kwargs)
            inp = _first_input(args, kwargs)
            stats = None
            if kind == "layer_norm":
                node = output.grad_fn  # the stats its own backward saved: no recomputation
                if node is not None and type(node).__name__ == "NativeLayerNormBackward0":
                    stats = (node._saved_result1, node._saved_result2)
            i = len(calls)
            calls.append(LayerCall(key, mod, kind, own, inp, stats))
            if state["first"] is None:
                state["first"] = output  # the backward target (forward order): its node never runs
                output.register_hook(functools.partial(fire, i, False))
            else:
                # A pre-hook on the node that made the output sees the output's gradient
                # before that node runs: what a tensor hook sees, at a third of the cost.
                output.grad_fn.register_prehook(functools.partial(fire_pre, i, output.output_nr))
            return output

        def attention(batch: dict, original, *args, **kwargs):
            batch["n"] = _first_input(args, kwargs).shape[0]  # B * windows
            return original(*args, **kwargs)

        def bias(key: str, mod: nn.Module, own: list[str], original, batch: dict):
            with torch.no_grad():
                b = original()  # (1, heads, N, N), looked up in the table
            # One copy per window, a leaf that backward is asked for: its gradient is the
            # per-window one, and autograd computes no summed table gradient.
            full = b.expand(batch["n"], -1, -1, -1).requires_grad_()
            full.register_hook(functools.partial(fire, len(calls), True))
            calls.append(LayerCall(key, mod, "window_attention", own, None))
            state["roots"].append(full)
            return full

        def shadow(module: nn.Module, name: str, fn) -> None:
            # An instance attribute shadows the class's method; set in the instance dict (what
            # Module.__setattr__ ends up doing for a plain callable, minus its checks).
            patched.append((module, name, module.__dict__.get(name)))
            module.__dict__[name] = fn
            if getattr(module, name) is not fn:  # `supports` refuses such classes; never record half a model
                raise RuntimeError(f"cannot record {type(module).__name__}.{name} (not a plain method of its "
                                   "class): use method='vmap'")

        try:
            for key, module, kind, own in self.layers:
                if kind == "window_attention":
                    batch: dict[str, int] = {}
                    shadow(module, "_get_rel_pos_bias",
                           functools.partial(bias, key, module, own, module._get_rel_pos_bias, batch))
                    shadow(module, "forward", functools.partial(attention, batch, module.forward))
                else:
                    shadow(module, "forward",
                           functools.partial(record, key, module, kind, own, _stock_matmul(module), module.forward))
            yield
        finally:
            for module, name, before in reversed(patched):
                if before is None:
                    del module.__dict__[name]  # back to the class's method
                else:
                    module.__dict__[name] = before

    def run(self, x: torch.Tensor, y: torch.Tensor, sink) -> torch.Tensor:
        """Forward + one backward over prepared inputs; returns detached per-sample losses (n,).

        Python's cyclic garbage collector is paused for the pass (and restored after, also on
        errors): the recording makes hundreds of small Python objects a pass (layer calls,
        bound hooks, saved-tensor wrappers), all freed by reference counting when the pass
        ends, but while they are alive they crossed the collector's threshold about once a step, and every collection walked them
        (swin_micro, batch 32: 275 young- and 25 middle-generation collections in 300 steps,
        0.18 ms a step; none in plain steps)."""
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run(x, y, sink)  # its locals (the graph, the hooks' state) die on return
        finally:
            if enabled:
                gc.enable()

    def _run(self, x: torch.Tensor, y: torch.Tensor, sink) -> torch.Tensor:
        state = {"fired": 0, "roots": [], "first": None, "calls": [], "sink": sink}
        try:
            with self._hooks(state), self._autocast(x.device):
                logits = self.module(x)
            losses = self._per_sample_loss(logits.float(), y)  # (n,)
            # One backward. Its inputs are the FIRST trainable layer's output (every later layer
            # lies on the way to it) and the per-window bias copies; parameters are not asked
            # for, so autograd skips every summed weight gradient, and the tensor hooks consume
            # each layer's gradient as it passes.
            inputs = ([state["first"]] if state["first"] is not None else []) + state["roots"]
            if inputs:
                torch.autograd.grad(losses.sum(), inputs, allow_unused=True)
            if state["fired"] != len(state["calls"]):  # every recorded call (slots stay, emptied)
                raise RuntimeError(
                    f"hook-based per-sample gradients reached {state['fired']} of {len(state['calls'])} layer calls; "
                    "this model's layers do not form one chain: use method='vmap'")
            return losses.detach()
        finally:
            # The hooks live on autograd nodes (C++), and what they reach -- each call's input
            # activation, the sink's stored (a, g), the first output -- leads back to those
            # nodes through grad_fn: a reference cycle that Python's garbage collector cannot
            # see, which kept every step's graph and activations alive (~30 MiB a step leaked at
            # swin_micro, batch 32, and the page faults of fresh memory every step). Emptying
            # the state the hooks share (and the list of calls they hold) breaks it.
            state["calls"].clear()
            state.clear()


def f32(t: torch.Tensor) -> torch.Tensor:
    """`t` as float32 (itself when it already is: no dispatch for a no-op cast)."""
    return t if t.dtype == torch.float32 else t.float()


def linear_io(call: LayerCall, g: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a (n, T, d_in), g (n, T, d_out)) of a Linear or patchifier call, T tokens per sample."""
    a = call.a
    if call.kind == "patchify":
        k = call.module.kernel_size
        a = F.unfold(a, k, stride=call.module.stride).transpose(1, 2)  # (n, L, Cin*kh*kw)
        g = g.flatten(2).transpose(1, 2)  # (n, L, Cout)
        return a, g
    if a.dim() != 3 or a.shape[0] != n:  # windows folded into the batch: sample-major, (n, T, d)
        a = a.reshape(n, -1, a.shape[-1])
    if g.dim() != 3 or g.shape[0] != n:
        g = g.reshape(n, -1, g.shape[-1])
    return a, g


def layer_norm_grads(call: LayerCall, g: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    """Per-sample LayerNorm gradients {param: (n, C)} (float32)."""
    a = f32(call.a)
    g = f32(g)
    if call.ln_stats is not None:
        mean, rstd = call.ln_stats
        xhat = (a - f32(mean)).mul_(f32(rstd))
    else:
        xhat = F.layer_norm(a, call.module.normalized_shape, eps=call.module.eps)
    res: dict[str, torch.Tensor] = {}
    if "weight" in call.own:
        res["weight"] = xhat.mul_(g).reshape(n, -1, g.shape[-1]).sum(1)
    if "bias" in call.own:
        res["bias"] = g.reshape(n, -1, g.shape[-1]).sum(1)
    return res


def bias_table_grads(call: LayerCall, g: torch.Tensor, n: int) -> torch.Tensor:
    """Per-sample gradient (n, rows, heads) of a window attention's relative-position bias table."""
    module = call.module
    heads, area = module.num_heads, module.window_area
    # g: (n * windows, heads, N, N) -> summed over each sample's windows -> (n, heads, N*N)
    per = g.reshape(n, -1, heads, area * area).sum(1, dtype=torch.float32)
    table = module.relative_position_bias_table  # (rows, heads)
    idx = module.relative_position_index.reshape(-1)  # (N*N,) row of the table per pair
    # Added along the last (contiguous) dimension, then viewed as (n, rows, heads): 1.5-2x
    # faster than adding rows of the transposed (n, N*N, heads) (swin_micro: 98 vs 174 us a step).
    dt = per.new_zeros((n, heads, table.shape[0]))
    dt.index_add_(2, idx, per)
    return dt.transpose(1, 2).contiguous()  # the copy a flattening reshape would make anyway


def as_multiplied(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """A layer's recorded input as its matmul took it: under autocast (g, the output's
    gradient, in bf16 / fp16) rounded to g's dtype, as autocast rounded it (a LayerNorm's
    float32 output, the image); else as recorded. The layer's gradient is that of this
    input, and its values are TF32 numbers (`per_sample.tf32_products`)."""
    return a.to(g.dtype) if g.dtype in LOW_PRECISION and a.dtype != g.dtype else a


def per_sample_rule(call: LayerCall, g: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    """Per-sample gradients of one call of one layer: {param name: (n, *shape)} (float32)."""
    if call.kind == "window_attention":
        return {"relative_position_bias_table": bias_table_grads(call, g, n)}
    if call.kind == "layer_norm":
        return layer_norm_grads(call, g, n)
    a, g = linear_io(call, g, n)
    low = g.dtype in LOW_PRECISION
    a, g = f32(as_multiplied(a, g)), f32(g)
    res: dict[str, torch.Tensor] = {}
    if "weight" in call.own:
        # Under autocast, operands of bf16 / fp16 values: exact TF32 products, the float32 result
        # at tensor-core speed (IEEE float32 products were a third of a bf16 step's GEMM work).
        with tf32_products() if low else contextlib.nullcontext():
            res["weight"] = torch.bmm(g.transpose(1, 2), a).view(n, *call.module.weight.shape)  # (n, C_out, C_in)
    if "bias" in call.own:
        res["bias"] = g.sum(1)
    return res


class HookPerSample:
    """Per-sample gradients of the trainable parameters via hooks (see module docstring).

    Same call interface as `per_sample._PerSample`: `params()`, `prepare(x)`,
    `__call__(params, x, y) -> ({name: (n, *shape)}, losses (n,))`.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, autocast_dtype: torch.dtype | None,
                 recorder: Recorder | None = None):
        self.recorder = recorder if recorder is not None else Recorder(model, loss_fn, autocast_dtype)
        self.names = self.recorder.names
        self.model = model

    def params(self) -> dict[str, torch.Tensor]:
        """Unused by this route (the live parameters are used); kept for the interface."""
        return {}

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Samples, or frozen features computed once without autograd."""
        return self.recorder.prepare(x)

    def __call__(self, params, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-sample gradients {name: (n, *shape)} (float32) and losses (n,)."""
        n = x.shape[0]
        out: dict[str, torch.Tensor] = {}

        def sink(call: LayerCall, g: torch.Tensor) -> None:
            for pname, value in per_sample_rule(call, g, n).items():
                key = call.key + pname
                out[key] = out[key] + value if key in out else value  # a layer called twice: sum

        losses = self.recorder.run(x, y, sink)
        for name in self.names:  # cannot happen for a chain; kept for a parameter-free path
            if name not in out:
                p = dict(self.model.named_parameters())[name]
                out[name] = torch.zeros((n, *p.shape), device=x.device, dtype=torch.float32)
        return {k: out[k] for k in self.names}, losses


__all__ = ["HookPerSample", "LayerCall", "Recorder", "as_multiplied", "f32", "frozen_features", "frozen_split",
           "per_sample_rule", "supports"]
