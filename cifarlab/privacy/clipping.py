"""Sums of per-example clipped gradients, the part of DP-SGD that costs (Abadi et al. 2016).

For a batch of B examples, each given as `views` consecutive augmented rows of x (augmentation
multiplicity, De et al. 2022), both functions return, per trainable parameter,

    sum_i min(1, C / ||g_i||) g_i,   g_i = gradient of mean_k loss(view_k of example i),

i.e. a view-averaged per-example gradient clipped to norm C as a whole (all parameters together).
Noise and averaging are the optimizer's job (Opacus DPOptimizer).

- `fast` (default): "book-keeping" (Bu et al. 2023, "Differentially Private Optimization on
  Large Model at Small Cost", arXiv:2210.00038). One forward and ONE backward that computes only
  the gradients flowing between layers; from each layer's input a and output gradient g it gets
  the per-example gradient norms (mixed ghost norm, Bu et al. 2022, arXiv:2205.10683: the Gram
  trick where it is cheaper, else per-example gradients from grouped weight-gradient calls, or
  for an RGB input layer from a multiply-and-sum over its patches that torch.compile fuses (CPU,
  small filters) or one convolution of the inputs with the output gradients; a weight
  standardisation enters the norms in closed form, never per example), then the clipped sum with
  the ordinary weight-gradient kernel applied to c_i * g_i. No second backward (Opacus ghost
  clipping needs one) and no (B, params) tensor for conv/linear layers (Opacus hooks keep one per
  layer). Written here because Opacus 1.6 has neither the single-pass form nor a conv norm rule
  that avoids unfolding every patch (it computes conv norms by unfold + einsum).
- `hooks`: Opacus's GradSampleModule materialises every per-example gradient; the reference path.

Under bf16 autocast the forward and backward matmuls run in bf16, and everything that the clipping bound rests
on is fp32: each layer's inputs and output gradients (bf16 activations and backprops) are upcast before any
per-example work, so per-example gradients, their norms, the clipping factors and the clipped sum are formed and
accumulated in fp32 (`hooks`: Opacus forms the per-example gradients in the backprops' dtype; they are upcast
before the view sum). The norm and the clipped sum then come from the same fp32 numbers, so every clipped
per-example gradient has norm <= C up to fp32 rounding, whatever bf16 did to the gradient itself.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from cifarlab.errors import ConfigError
from cifarlab.models.layers import WSConv2d

CLIP_METHODS = ("fast", "hooks")


@dataclass
class ClipResult:
    grads: list[Tensor]  # clipped per-example gradients summed over the batch, one per trainable parameter
    losses: Tensor  # (B,) per-example loss, averaged over views
    logits: Tensor  # (B, classes) averaged over views, detached
    norms: Tensor  # (B,) per-example gradient norms before clipping


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def clipped_grad_sum(model: nn.Module, x: Tensor, y: Tensor, *, max_grad_norm: float, views: int = 1,
                     method: str = "fast") -> ClipResult:
    """Per-example clipped gradient sum of the cross-entropy for x (B*views, ...) and y (B*views,)."""
    if method == "fast":
        return _fast(model, x, y, max_grad_norm=max_grad_norm, views=views)
    if method == "hooks":
        return _hooks(model, x, y, max_grad_norm=max_grad_norm, views=views)
    raise ConfigError(f"unknown per-sample gradient method {method!r}; valid: {', '.join(CLIP_METHODS)}")


def check_fast_supported(model: nn.Module) -> None:
    """The fast path needs every parameter owned by a leaf layer (how hooks see its input and output)."""
    for name, module in model.named_modules():
        owns = any(p.requires_grad for p in module.parameters(recurse=False))
        if owns and any(p.requires_grad for child in module.children() for p in child.parameters()):
            raise ConfigError(
                f"layer {name or type(module).__name__!r} ({type(module).__name__}) owns parameters and also has "
                "sub-layers with parameters, so its per-example gradients cannot be taken from its input and "
                "output; move its own parameters into a leaf layer, or use grad_sample_mode='hooks'")


def _per_example_loss(logits: Tensor, y: Tensor, views: int) -> tuple[Tensor, Tensor]:
    losses = F.cross_entropy(logits.float(), y, reduction="none")  # (B*views,)
    return losses.view(-1, views).mean(1), logits.detach().float().view(-1, views, logits.shape[-1]).mean(1)


def _coefficients(sq_norms: Tensor, max_grad_norm: float) -> tuple[Tensor, Tensor]:
    norms = sq_norms.clamp(min=0).sqrt()
    return norms, (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # Opacus's formula


# --- the fast path ---------------------------------------------------------------------------------------------


@dataclass
class _Tap:
    """What one layer saw in the forward pass and received in the backward pass."""

    module: nn.Module
    inputs: tuple[Tensor, ...]
    output: Tensor
    version: int  # the output's version counter at the forward: it changes if an in-place op rewrites it
    grad_output: Tensor | None = None


@contextmanager
def _tapping(modules: list[nn.Module]) -> Iterator[list[_Tap]]:
    taps: list[_Tap] = []
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        if not output.requires_grad:
            return
        tap = _Tap(module, tuple(t.detach() for t in inputs if isinstance(t, Tensor)), output, output._version)
        taps.append(tap)
        # A tensor hook registered now receives the gradient of this output even if a later
        # in-place op (ReLU(inplace=True)) rewrites the tensor. It closes over `tap`, which holds the output:
        # a cycle through the tensor's hooks that Python's collector cannot free, so it is removed on exit
        # (kept, it leaked every call's activations: ~100 MB a step for cnn at batch 128).
        handles.append(output.register_hook(lambda g: setattr(tap, "grad_output", g)))

    handles += [m.register_forward_hook(hook) for m in modules]
    try:
        yield taps
    finally:
        for handle in handles:
            handle.remove()


def _fast(model: nn.Module, x: Tensor, y: Tensor, *, max_grad_norm: float, views: int) -> ClipResult:
    params = trainable_parameters(model)
    layers = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    x = x.detach().requires_grad_(True)
    with _tapping(layers) as taps:
        losses, logits = _per_example_loss(model(x), y, views)
        # Ask for the gradients of the layer outputs only: autograd then skips every weight gradient, which
        # the rules below compute already clipped. An output rewritten in place no longer names its
        # gradient; asking for x's then makes the backward run through (and fire the hook of) that layer.
        targets = [t.output for t in taps if t.output._version == t.version]
        if len(targets) < len(taps):
            targets.append(x)
        torch.autograd.grad(losses.sum(), targets, allow_unused=True)
    if len({id(t.module) for t in taps}) != len(taps):
        raise ConfigError("a layer ran twice in one forward pass (shared weights); the fast path does not support "
                          "this, use grad_sample_mode='hooks'")
    with torch.autocast(x.device.type, enabled=False):  # norms in fp32: the clipping bound must hold exactly
        rules = [_layer_rule(t, views) for t in taps if t.grad_output is not None]
        del taps  # frees the layer outputs before the per-example work
        sq_norms = sum((rule.sq_norms for rule in rules), torch.zeros(len(losses), device=x.device))
        norms, coef = _coefficients(sq_norms, max_grad_norm)
        summed = {}
        for rule in rules:
            summed.update(rule.clipped_sum(coef))
    grads = [summed.get(p, torch.zeros_like(p)).to(p.dtype) for p in params]  # unused layers: zero gradient
    return ClipResult(grads=grads, losses=losses.detach(), logits=logits, norms=norms)


@dataclass
class _LayerRule:
    sq_norms: Tensor  # (B,) this layer's contribution to the squared per-example gradient norms
    clipped_sum: Callable[[Tensor], dict[nn.Parameter, Tensor]]  # coefficients (B,) -> sum_i c_i g_i per parameter


def _layer_rule(tap: _Tap, views: int) -> _LayerRule:
    module = tap.module
    a, g = tap.inputs[0].float(), tap.grad_output.float()
    if type(module) is nn.Linear:
        return _linear_rule(module, a, g, views)
    if (type(module) in (nn.Conv2d, WSConv2d) and not isinstance(module.padding, str)
            and module.padding_mode == "zeros"):
        # A bf16 output (autocast) would enter the weight-standardised norm with bf16 rounding that the clipped
        # sum does not see, so the clipping bound would hold only up to bf16 error: recompute it in fp32 instead.
        kept = tap.output._version == tap.version and tap.output.dtype == torch.float32
        return _conv2d_rule(module, a, g, views, output=tap.output.detach() if kept else None)
    return _generic_rule(module, [t.float() for t in tap.inputs], g, views)


def _gram_sq_norms(a: Tensor, g: Tensor) -> Tensor:
    """||sum_t g_t a_t^T||_F^2 per example from a (B, T, d), g (B, T, o) without forming the (o, d) gradient:
    sum_{t,s} (a_t . a_s)(g_t . g_s) (Goodfellow 2015; Li et al. 2022 "ghost norm")."""
    if a.shape[1] == 1:
        return a.square().sum((1, 2)) * g.square().sum((1, 2))
    return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))


def _ghost_is_cheaper(positions: int, d: int, o: int, *, slowdown: float = 1.0) -> bool:
    # Gram: T^2 (d + o) flops per example, in batched matmuls; explicit per-example gradient: T d o flops (and d o
    # memory), by a kernel `slowdown` times slower per flop than the matmuls.
    return positions * (d + o) < slowdown * d * o


def _weight(coef: Tensor, views: int, ndim: int) -> Tensor:
    return coef.repeat_interleave(views).view(-1, *([1] * (ndim - 1)))


def _linear_rule(module: nn.Linear, a: Tensor, g: Tensor, views: int) -> _LayerRule:
    batch = a.shape[0] // views
    a3, g3 = a.reshape(batch, -1, a.shape[-1]), g.reshape(batch, -1, g.shape[-1])  # (B, views*T, d), (B, views*T, o)
    per_example = None
    if _ghost_is_cheaper(a3.shape[1], a3.shape[2], g3.shape[2]):
        sq = _gram_sq_norms(a3, g3)
    else:
        per_example = torch.einsum("bto,btd->bod", g3, a3)
        sq = per_example.square().sum((1, 2))
    bias = g3.sum(1) if module.bias is not None and module.bias.requires_grad else None  # (B, o) per example
    if bias is not None:
        sq = sq + bias.square().sum(1)

    def clipped_sum(coef: Tensor) -> dict[nn.Parameter, Tensor]:
        out = {}
        if module.weight.requires_grad:
            out[module.weight] = torch.einsum("b,b...->...", coef, per_example) if per_example is not None else (
                (g3 * coef.view(-1, 1, 1)).flatten(0, 1).T @ a3.flatten(0, 1))
        if bias is not None:
            out[module.bias] = coef @ bias
        return out

    return _LayerRule(sq, clipped_sum)


def _conv2d_rule(module: nn.Conv2d, a: Tensor, g: Tensor, views: int, *, output: Tensor | None) -> _LayerRule:
    batch, c_out, groups = a.shape[0] // views, g.shape[1], module.groups
    kernel = module.weight.shape[1:]  # (c_in / groups, kh, kw)
    positions = views * g.shape[2] * g.shape[3]
    conv_args = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)
    standardized = _standardize(module) if type(module) is WSConv2d else None
    sq = torch.zeros(batch, device=a.device)
    per_example = None  # (B, *weight.shape) when formed: the clipped sum is then a cheap weighted sum
    if module.weight.requires_grad:
        if groups == 1 and _ghost_is_cheaper(positions, kernel.numel(), c_out, slowdown=_GROUPED_SLOWDOWN):
            patches = _patches(a, module).view(batch, positions, -1)  # (B, views*L, d)
            gg = g.view(batch, views, c_out, -1).transpose(2, 3).reshape(batch, positions, c_out)
            if standardized is None:
                sq = _gram_sq_norms(patches, gg)
            else:
                if output is None:  # rewritten in place, or bf16: recompute the bias-free output
                    y = patches @ standardized[0].flatten(1).T
                else:
                    y = output.view(batch, views, c_out, -1).transpose(2, 3).reshape(batch, positions, c_out)
                    if module.bias is not None:
                        y = y - module.bias.detach().float()
                sq = _ws_gram_sq_norms(patches, gg, y, *standardized)
        else:
            per_example = _conv_weight_per_example(module, a, g, views)  # w.r.t. w_hat if standardised
            sq = (per_example.view(batch, -1).square().sum(1) if standardized is None
                  else _ws_per_example_sq_norms(per_example, *standardized))
    bias = None  # (B, o): per-example bias gradients, the output gradient summed over views and positions
    if module.bias is not None and module.bias.requires_grad:
        bias = g.view(batch, views, c_out, -1).sum((1, 3))
        sq = sq + bias.square().sum(1)

    def clipped_sum(coef: Tensor) -> dict[nn.Parameter, Tensor]:
        out = {}
        if module.weight.requires_grad:
            if per_example is not None:
                grad_w = torch.einsum("b,b...->...", coef, per_example)
            else:
                gc = g * _weight(coef, views, g.ndim)
                grad_w = torch.nn.grad.conv2d_weight(a, module.weight.shape, gc, groups=groups, **conv_args)
            # w.r.t. w_hat so far; the standardisation's Jacobian is linear and shared by the examples: map once
            out[module.weight] = grad_w if standardized is None else _standardize_backward(grad_w, *standardized)
        if bias is not None:
            out[module.bias] = coef @ bias
        return out

    return _LayerRule(sq, clipped_sum)


# Below this many input channels a stride-1 conv's per-example weight gradients come faster as one convolution
# of the inputs (examples as channels) with the output gradients as filters than as a grouped weight-gradient
# call: 26 vs 65 ms for the 3-channel input layer of `cnn` at batch 256 on 2 CPU cores, while with 32 or 64
# input channels the grouped call is 1.5-2.3x faster.
_FEW_INPUT_CHANNELS = 8
# The grouped weight-gradient call runs at about half the speed per flop of the Gram rule's batched matmuls: on 2 CPU
# cores at batch 256, Gram vs grouped took 101 vs 182 ms for ScatterNet's 243->64 3x3 conv on 8x8 maps (flops
# 1.03 : 1; at batch 1024 in one call, 0.4 vs 22 s) and 6 vs 18 ms for wrn's 64->128 1x1 stride-2 shortcut (1.5 : 1).
_GROUPED_SLOWDOWN = 2.0
# Examples per grouped weight-gradient call. The kernel slows down per example with many groups: at batch 1024 on
# 2 CPU cores, one call vs calls of 64 examples took 150 vs 112 ms (32->64 3x3 on 16x16) and 178 vs 132 ms
# (64->64 3x3 on 8x8), with 32 to 128 per call within noise of 64.
_GROUPED_CHUNK = 64


def _conv_weight_per_example(module: nn.Conv2d, a: Tensor, g: Tensor, views: int) -> Tensor:
    """Per-example weight gradients (B, *weight.shape), each summed over its example's `views` rows."""
    n, c_in, height, width = a.shape
    batch, c_out, kernel = n // views, g.shape[1], module.weight.shape[1:]
    if (module.groups == 1 and c_in < _FEW_INPUT_CHANNELS and module.stride == (1, 1)
            and module.dilation == (1, 1)):
        if a.device.type == "cpu" and c_out * kernel[1:].numel() <= _DIRECT_MAX_WEIGHTS_PER_INPUT_CHANNEL and (
                2 * n * c_out * kernel.numel() * g.shape[2] * g.shape[3] >= _DIRECT_MIN_FLOPS):
            per_example = _direct_per_example(a, g, views, module.padding)
            if per_example is not None:
                return per_example
        # dW_i[o, c] = sum_v sum_t g_iv[o, t] a_iv[c, t + shift]: a convolution of the inputs, channels = the
        # batch's rows and batch = c_in, with B groups of c_out filters, each filter an example's output gradients
        # (its views as the group's input channels).
        filters = g.view(batch, views, c_out, *g.shape[2:]).transpose(1, 2).reshape(batch * c_out, views, *g.shape[2:])
        out = F.conv2d(a.transpose(0, 1), filters, padding=module.padding, groups=batch)  # (c_in, B * c_out, kh, kw)
        return out.view(c_in, batch, c_out, *kernel[1:]).permute(1, 2, 0, 3, 4).contiguous()
    # Grouped weight-gradient calls: fold the examples into channel groups, so the "batch" left to sum over is
    # the views (averaging them before clipping, for free).
    a_folded = a.view(batch, views, c_in, height, width).transpose(0, 1).reshape(views, batch * c_in, height, width)
    g_folded = g.view(batch, views, *g.shape[1:]).transpose(0, 1).reshape(views, batch * c_out, *g.shape[2:])
    chunks = []
    for start in range(0, batch, _GROUPED_CHUNK):
        count = min(_GROUPED_CHUNK, batch - start)
        chunks.append(torch.nn.grad.conv2d_weight(
            a_folded[:, start * c_in:(start + count) * c_in], (count * c_out, *kernel),
            g_folded[:, start * c_out:(start + count) * c_out], groups=count * module.groups, stride=module.stride,
            padding=module.padding, dilation=module.dilation))
    return torch.cat(chunks).view(batch, c_out, *kernel)


# A stride-1 conv with few input channels and small filters per input channel (the RGB input layer of most CIFAR
# nets) gets its per-example weight gradients fastest from one fused multiply-and-sum over each example's patches,
# which eager PyTorch lacks (it would materialise every patch times every output channel) and torch.compile
# generates (a C++ loop on CPU, ~70 GFLOP/s on 2 cores). Compiled (in chunks of 64) vs the one-convolution path
# above, batch 256, 2 CPU cores, ms: 3->6 5x5 on 32x32 (tutorial) 3.1 vs 7.3, 3->6 5x5 pad 2 (tutorial_deep)
# 3.3 vs 9.7, 3->6 3x3 1.3 vs 4.3, 3->16 3x3 pad 1 (wrn) 3.3 vs 7.3, 3->32 6.3 vs 10.6, 3->64 3x3 pad 1 (resnets)
# 12.8 vs 16.8, 6->16 5x5 pad 2 on 16x16 (tutorial_deep) 4.3 vs 8.0, 6->18 3x3 on 15x15 (tutorial_wide) 1.7 vs 3.5;
# slower for 3->64 5x5 pad 2 (cnn, 32 vs 25: 1,600 weights per input channel) and 6->16 5x5 on 14x14 (tutorial's
# second conv, 3.1 vs 2.7: a short 10x10 sum). On CPU only: GPUs were not measured.
_DIRECT_MAX_WEIGHTS_PER_INPUT_CHANNEL = 600  # c_out * kh * kw
_DIRECT_MIN_FLOPS = 5e7  # smaller layers keep the convolution: a compile (~1 s per layer shape) would not pay back
_DIRECT_CHUNK = 64  # examples per compiled call: one fixed shape per layer, whatever the (Poisson) batch size


class _RanEagerly(Exception):
    """_patch_products was called without torch.compile (disabled, forced eager, or out of recompiles)."""


def _patch_products(a: Tensor, g: Tensor, views: int, padding: tuple[int, int]) -> Tensor:
    """dW_i[o, c, kh, kw] = sum_v sum_yx g_iv[o, y, x] a_iv[c, y + kh, x + kw] for a (B*views, c, H, W) and
    g (B*views, o, h, w) of a stride-1 conv: (B, o, c, kh, kw). Runs compiled only (see above)."""
    if not torch.compiler.is_compiling():  # run eagerly it would materialise every patch times every filter (GBs)
        raise _RanEagerly
    a = F.pad(a, (padding[1], padding[1], padding[0], padding[0]))
    n, c_in, height, width = a.shape
    c_out, out_h, out_w = g.shape[1:]
    s0, s1, s2, s3 = a.stride()
    patches = a.as_strided((n // views, views, 1, c_in, height - out_h + 1, width - out_w + 1, out_h, out_w),
                           (views * s0, s0, 0, s1, s2, s3, s2, s3))
    return (g.view(n // views, views, c_out, 1, 1, 1, out_h, out_w) * patches).sum((1, 6, 7))


class _CompiledPatchProducts:
    """`_patch_products` compiled (once per input shape); None where it cannot run compiled."""

    def __init__(self) -> None:
        self.function: Callable | None = None
        self.failed = False

    def __call__(self, a: Tensor, g: Tensor, views: int, padding: tuple[int, int]) -> Tensor | None:
        if self.failed:
            return None
        if self.function is None:  # at first use: torch.compile imports dynamo, seconds that most runs never need
            self.function = torch.compile(_patch_products, dynamic=False)
        try:
            return self.function(a, g, views, padding)
        except _RanEagerly:
            return None
        except Exception as error:  # whatever stops inductor here, the convolution path gives the same numbers
            self.failed = True
            reason = (str(error).splitlines() or [""])[0]
            warnings.warn(f"torch.compile failed ({type(error).__name__}: {reason}); per-example gradients of "
                          "few-channel convolutions fall back to a slower kernel")
            return None


_compiled_patch_products = _CompiledPatchProducts()


def _direct_per_example(a: Tensor, g: Tensor, views: int, padding: tuple[int, int]) -> Tensor | None:
    """Per-example weight gradients (B, o, c, kh, kw) by the compiled kernel in chunks of _DIRECT_CHUNK examples
    (the last one zero-padded), or None if it cannot compile."""
    batch, rows = a.shape[0] // views, _DIRECT_CHUNK * views
    chunks = []
    for start in range(0, a.shape[0], rows):
        a_chunk, g_chunk = a[start:start + rows], g[start:start + rows]
        if len(a_chunk) < rows:  # zero output gradients: the padded examples' gradients are zero, then dropped
            a_chunk = torch.cat([a_chunk, a_chunk.new_zeros(rows - len(a_chunk), *a.shape[1:])])
            g_chunk = torch.cat([g_chunk, g_chunk.new_zeros(rows - len(g_chunk), *g.shape[1:])])
        out = _compiled_patch_products(a_chunk, g_chunk, views, padding)
        if out is None:
            return None
        chunks.append(out)
    return torch.cat(chunks)[:batch]


# Weight Standardization (WSConv2d, Qiao et al. 2019): the conv runs with w_hat = (w - mean) * rstd per output
# channel, rstd = (var + eps)^-1/2 over (c_in, kh, kw). Per-example gradients come for w_hat and are mapped to w
# through the standardisation's Jacobian, which is linear and shared by all examples (so the clipped sum maps
# once). test_privacy_clipping checks this against autograd through WSConv2d itself.


def _standardize(module: WSConv2d) -> tuple[Tensor, Tensor]:
    w = module.weight.detach().float()
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    rstd = torch.rsqrt(w.var(dim=(1, 2, 3), unbiased=False, keepdim=True) + module.eps)
    return (w - mean) * rstd, rstd  # (o, c, kh, kw), (o, 1, 1, 1)


def _standardize_backward(grad_hat: Tensor, w_hat: Tensor, rstd: Tensor) -> Tensor:
    """J^T grad for grads (..., o, c, kh, kw) w.r.t. w_hat: rstd (G - mean(G) - w_hat mean(G w_hat)), as LayerNorm."""
    dims = (-3, -2, -1)
    return rstd * (grad_hat - grad_hat.mean(dims, keepdim=True) - w_hat * (grad_hat * w_hat).mean(dims, keepdim=True))


def _ws_gram_sq_norms(patches: Tensor, gg: Tensor, y: Tensor, w_hat: Tensor, rstd: Tensor) -> Tensor:
    """||J^T G_i||^2 without forming G_i = sum_t gg_t patches_t^T, from S1 = sum(G_io) and
    S2 = G_io . w_hat_o = sum_t gg_to y_to (y the bias-free output); see _ws_sq_norms."""
    scaled = _gram_sq_norms(patches, gg * rstd.flatten())
    return _ws_sq_norms(scaled, torch.einsum("bto,bt->bo", gg, patches.sum(-1)), (gg * y).sum(1), w_hat, rstd)


def _ws_per_example_sq_norms(per_example: Tensor, w_hat: Tensor, rstd: Tensor) -> Tensor:
    """||J^T G_i||^2 from per-example gradients G (B, o, c, kh, kw) w.r.t. w_hat, without mapping each one."""
    flat = per_example.flatten(2)  # (B, o, n)
    scaled = (flat.square().sum(2) * rstd.flatten().square()).sum(1)
    return _ws_sq_norms(scaled, flat.sum(2), torch.einsum("bon,on->bo", flat, w_hat.flatten(1)), w_hat, rstd)


def _ws_sq_norms(scaled: Tensor, s1: Tensor, s2: Tensor, w_hat: Tensor, rstd: Tensor) -> Tensor:
    """Per-example ||J^T G_i||^2 for gradients G_i w.r.t. w_hat. Per output channel o, with n = c*kh*kw,
    S1 = sum(G_io), S2 = G_io . w_hat_o, and sum(w_hat_o) = 0:
    ||J^T G_io||^2 = rstd_o^2 (||G_io||^2 - S1^2 / n - 2 S2^2 / n + S2^2 ||w_hat_o||^2 / n^2).
    scaled: sum_o rstd_o^2 ||G_io||^2 (B,); s1, s2: (B, o)."""
    n = w_hat[0].numel()
    w_sq = w_hat.flatten(1).square().sum(1)  # (o,)
    correction = -s1.square() / n - 2 * s2.square() / n + s2.square() * w_sq / n**2
    return scaled + (rstd.flatten().square() * correction).sum(1)


def _patches(a: Tensor, module: nn.Conv2d) -> Tensor:
    """The conv's input patches, (N, L, c_in*kh*kw) for L output positions. A strided view copied once:
    F.unfold (im2col) was several times slower on CPU for these shapes."""
    ph, pw = module.padding
    a = F.pad(a, (pw, pw, ph, ph))
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    n, c, height, width = a.shape
    out_h, out_w = (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1
    s0, s1, s2, s3 = a.stride()
    view = a.as_strided((n, out_h, out_w, c, kh, kw), (s0, sh * s2, sw * s3, s1, dh * s2, dw * s3))
    return view.reshape(n, out_h * out_w, c * kh * kw)


def _generic_rule(module: nn.Module, inputs: list[Tensor], g: Tensor, views: int) -> _LayerRule:
    """Any other layer: explicit per-example gradients (Opacus's rule for its type, else torch.func)."""
    params = [p for p in module.parameters(recurse=False) if p.requires_grad]
    sampler = GradSampleModule.GRAD_SAMPLERS.get(type(module))
    if sampler is not None:
        per_view = sampler(module, inputs, g)
        per_view = [per_view[p] for p in params]
    else:
        per_view = _functorch_grad_samples(module, params, inputs, g)
    batch = g.shape[0] // views
    per_example = [s.reshape(batch, views, *s.shape[1:]).sum(1) for s in per_view]
    sq = sum(s.reshape(batch, -1).square().sum(1) for s in per_example)

    def clipped_sum(coef: Tensor) -> dict[nn.Parameter, Tensor]:
        return {p: torch.einsum("b,b...->...", coef, s) for p, s in zip(params, per_example)}

    return _LayerRule(sq, clipped_sum)


def _functorch_grad_samples(module: nn.Module, params: list[nn.Parameter], inputs: list[Tensor], g: Tensor) -> list[Tensor]:
    names = {id(p): name for name, p in module.named_parameters(recurse=False)}
    values = {names[id(p)]: p.detach() for p in params}

    def inner(values: dict[str, Tensor], args: tuple[Tensor, ...], g_one: Tensor) -> Tensor:
        out = functional_call(module, values, tuple(t.unsqueeze(0) for t in args))
        return (out * g_one.unsqueeze(0)).sum()

    samples = vmap(grad(inner), in_dims=(None, 0, 0))(values, tuple(inputs), g)
    return [samples[names[id(p)]] for p in params]


# --- the Opacus reference path ------------------------------------------------------------------------------------


def _hooks(model: nn.Module, x: Tensor, y: Tensor, *, max_grad_norm: float, views: int) -> ClipResult:
    params = trainable_parameters(model)
    saved = [p.grad for p in params]  # GradSampleModule's backward also fills .grad; leave it as it was
    wrapped = GradSampleModule(model, loss_reduction="sum")
    try:
        losses, logits = _per_example_loss(wrapped(x), y, views)
        losses.sum().backward()
        per_view = [p.grad_sample for p in params]  # in the backprops' dtype: bf16 under autocast
    finally:
        wrapped.to_standard_module()  # removes Opacus's hooks and per-parameter attributes
        for p, old in zip(params, saved):
            p.grad = old
    batch = len(losses)
    with torch.autocast(x.device.type, enabled=False):  # as in _fast: the clipping bound must hold exactly
        per_example = [s.float().reshape(batch, views, *p.shape).sum(1) for p, s in zip(params, per_view)]
        sq = sum(s.reshape(batch, -1).square().sum(1) for s in per_example)
        norms, coef = _coefficients(sq, max_grad_norm)
        grads = [torch.einsum("b,b...->...", coef, s) for s in per_example]
    return ClipResult(grads=grads, losses=losses.detach(), logits=logits, norms=norms)
