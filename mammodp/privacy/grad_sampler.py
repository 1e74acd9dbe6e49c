"""Fast per-sample gradients from ONE batched forward and backward (hook-based).

The `torch.func` route (`per_sample._PerSample`) differentiates each sample separately
under vmap: always correct, but every op pays vmap's batching overhead. This route runs
the model once on the batch, records each trainable layer's input activation `a` and,
from one `autograd.grad` call w.r.t. the layer OUTPUTS (so no summed weight gradient is
ever computed), its output gradient `g`, then forms per-sample gradients directly:

- Linear:     dW_b = sum_t g_bt a_bt^T,  db_b = sum_t g_bt
- LayerNorm:  dw_b = sum_t g_bt * xhat_bt,  db_b = sum_t g_bt (xhat: the normalised input)
- Conv2d used as a patchifier (stride == kernel, no padding): a Linear on unfolded patches
- timm WindowAttention's `relative_position_bias_table`: the bias is handed to attention
  expanded to one copy per window, (B * windows, heads, N, N); the gradient of that copy
  is summed over each sample's windows and scattered into the table rows.

Why this is valid for Swin although attention folds windows into the batch dimension:
timm's window partition is sample-major (row b * windows + w), so a layer's activation
(B * windows, N, C) reshapes to (B, windows * N, C) with each sample's tokens together.
A model opts in by setting `dp_sample_major = True` (SwinClassifier does); any trainable
parameter outside the supported layers makes `supports()` false and callers use vmap.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from mammodp.privacy.per_sample import LossFn, trainable_named_parameters


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
    return True


class HookPerSample:
    """Per-sample gradients of the trainable parameters via hooks (see module docstring).

    Same call interface as `per_sample._PerSample`: `params()`, `prepare(x)`,
    `__call__(params, x, y) -> ({name: (n, *shape)}, losses (n,))`.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, autocast_dtype: torch.dtype | None):
        if not supports(model):
            raise ValueError("model not supported by the hook-based per-sample gradients")
        self.model = model
        self.loss_fn = loss_fn
        self.autocast_dtype = autocast_dtype
        self.layers: list[tuple[str, nn.Module, str, list[str]]] = []  # (name, module, kind, own params)
        for name, module in model.named_modules():
            own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if own:
                self.layers.append((name, module, _layer_kind(module), own))
        self.names = list(trainable_named_parameters(model))
        # per-sample loss of logits (n, K): one loss_fn call per sample, batched by vmap
        self._per_sample_loss = vmap(lambda lg, t: loss_fn(lg.unsqueeze(0), t.unsqueeze(0)))

    def params(self) -> dict[str, torch.Tensor]:
        """Unused by this route (the live parameters are used); kept for the interface."""
        return {}

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs are used as they are."""
        return x

    @contextlib.contextmanager
    def _recording(self, n: int, out: dict[str, torch.Tensor], fired: list[int], roots: list[torch.Tensor]):
        """Hooks for one forward/backward: each trainable layer's output gets a tensor hook
        that turns its gradient into per-sample gradients as soon as backward produces it
        (then the gradient is freed, as in plain training)."""
        handles = []
        patched = []
        pending = [0]  # layer calls whose gradient hook must fire
        outputs: list[torch.Tensor] = []

        def collect(module, kind, own, prefix, a):
            pending[0] += 1

            def on_grad(g):
                with torch.no_grad():  # read activations, build no graph
                    for pname, value in self._rule(module, kind, own, a, g, n).items():
                        key = prefix + pname
                        out[key] = out[key] + value if key in out else value
                fired[0] += 1

            return on_grad

        for name, module, kind, own in self.layers:
            prefix = f"{name}." if name else ""
            if kind == "window_attention":
                original = module._get_rel_pos_bias
                batch = {}

                def pre(mod, inputs, batch=batch):
                    batch["n"] = inputs[0].shape[0]  # B * windows

                def bias(mod=module, own=own, prefix=prefix, original=original, batch=batch):
                    b = original()  # (1, heads, N, N), a function of the table
                    full = b.expand(batch["n"], -1, -1, -1)  # one copy per window: its own gradient
                    full.register_hook(collect(mod, "window_attention", own, prefix, None))
                    return full

                handles.append(module.register_forward_pre_hook(pre))
                module._get_rel_pos_bias = bias  # instance attribute shadows the method
                patched.append(module)
                # backward reaches the bias copies only if something upstream of them is asked for
                roots.append(module.relative_position_bias_table)
            else:
                def fwd(mod, inputs, output, own=own, prefix=prefix, kind=kind):
                    output.register_hook(collect(mod, kind, own, prefix, inputs[0]))
                    outputs.append(output)  # in forward order

                handles.append(module.register_forward_hook(fwd))
        try:
            yield outputs, pending
        finally:
            for h in handles:
                h.remove()
            for module in patched:
                del module._get_rel_pos_bias  # back to the class method

    def __call__(self, params, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-sample gradients {name: (n, *shape)} (float32) and losses (n,)."""
        n = x.shape[0]
        out: dict[str, torch.Tensor] = {}
        fired = [0]
        roots: list[torch.Tensor] = []
        ctx = (torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype)
               if self.autocast_dtype is not None else contextlib.nullcontext())
        with self._recording(n, out, fired, roots) as (outputs, pending), ctx:
            logits = self.model(x)
        losses = self._per_sample_loss(logits.float(), y)  # (n,)
        # One backward. Its inputs are the FIRST trainable layer's output (every later layer
        # lies on the way to it) and the bias tables (to reach their per-window copies);
        # parameters are otherwise not asked for, so autograd skips the summed weight
        # gradients, and the tensor hooks consume each layer's gradient as it passes.
        inputs = outputs[:1] + roots
        if inputs:
            torch.autograd.grad(losses.sum(), inputs, allow_unused=True)
        if fired[0] != pending[0]:
            raise RuntimeError(
                f"hook-based per-sample gradients reached {fired[0]} of {pending[0]} layer calls; "
                "this model's layers do not form one chain: use method='vmap'")
        for name in self.names:  # cannot happen for a chain; kept for a parameter-free path
            if name not in out:
                p = dict(self.model.named_parameters())[name]
                out[name] = torch.zeros((n, *p.shape), device=x.device, dtype=torch.float32)
        return {k: out[k] for k in self.names}, losses.detach()

    @staticmethod
    def _rule(module: nn.Module, kind: str, own: list[str], a: torch.Tensor | None, g: torch.Tensor,
              n: int) -> dict[str, torch.Tensor]:
        """Per-sample gradients of one call of one layer: {param name: (n, *shape)}."""
        g = g.float()
        if kind == "window_attention":
            heads, area = module.num_heads, module.window_area
            # g: (n * windows, heads, N, N) -> summed over each sample's windows -> (n, N*N, heads)
            per = g.reshape(n, -1, heads, area * area).sum(1).transpose(1, 2)
            table = module.relative_position_bias_table
            idx = module.relative_position_index.reshape(-1)  # (N*N,) row of the table per pair
            dt = per.new_zeros((n, *table.shape))  # (n, rows, heads)
            dt.index_add_(1, idx, per)
            return {"relative_position_bias_table": dt}
        a = a.float()
        if kind == "patchify":
            k = module.kernel_size
            a = F.unfold(a, k, stride=module.stride).transpose(1, 2)  # (n, L, Cin*kh*kw)
            g = g.flatten(2).transpose(1, 2)  # (n, L, Cout)
        else:
            a = a.reshape(n, -1, a.shape[-1])  # (n, tokens, C_in): sample-major folding
            g = g.reshape(n, -1, g.shape[-1])  # (n, tokens, C_out)
        res: dict[str, torch.Tensor] = {}
        if kind == "layer_norm":
            xhat = F.layer_norm(a, module.normalized_shape, eps=module.eps)
            if "weight" in own:
                res["weight"] = (g * xhat).sum(1)
            if "bias" in own:
                res["bias"] = g.sum(1)
            return res
        if "weight" in own:
            w = torch.bmm(g.transpose(1, 2), a)  # (n, C_out, C_in)
            res["weight"] = w.view(n, *module.weight.shape)
        if "bias" in own:
            res["bias"] = g.sum(1)
        return res


__all__ = ["HookPerSample", "supports"]
