"""LRP in one forward and one ordinary backward (the "gradient trick"), with zennit's rules.

zennit computes LRP with per-layer backward hooks: during the backward every rule-bearing layer runs its
rule-modified forward again and an inner ``autograd.grad`` through it. Here each layer computes its
original output ``z`` *and* what its rule needs (the modified output ``z'``) in the same forward, and
returns ``z`` with the rule's relevance redistribution as its vector-Jacobian product, so one plain
``autograd.grad(out, x, R)`` through the whole net yields the relevance (the quantity flowing backward
is the relevance itself, as in zennit, so every op without a rule -- gate multiplications, stacking,
flatten, max-pooling, IR-ResNet's constant border maps -- passes it on by its gradient, as in zennit).

For a layer ``z' = rho(W) x~ + b'`` with rule ``R_in = x~ * rho(W)^T (R / stab(z'))`` (epsilon, z+,
gamma, alpha-beta, z^B, flat) the product is written out as a ``torch.autograd.Function``: its forward
returns ``z`` and keeps ``x`` and ``stab(z')``, its backward is one transposed convolution per weight
branch (``torch.nn.grad.conv2d_input``). This is the stop-gradient form ``z' * sg(R / z') + sg(z - z')``
with the product spelled out: written with stop-gradients it needs an extra convolution of ``x * sg(x)``
per layer (the input factor of the rule), here the backward multiplies by ``x`` directly. Inputs that
are non-negative everywhere (every conv after a ReLU) skip the rule's negative-input branch, which is
exactly zero there (z+: one extra conv per layer instead of zennit's two, plus no recomputation).
The parameter-free rules use the stop-gradient form literally: ``Norm`` (residual ``Sum`` modules,
average pooling) returns ``sg(y) + f - sg(f)`` with ``f = pool(x * sg(x)) / sg(stab(y))``; ``Pass``
(activations, merged BatchNorms) returns the activation with the identity as its product.

Rules and composites are zennit's (0.5.1), term for term (same stabilisers, the same zeroed and clamped
biases, the same order of additions); :func:`facetool.explainers.lrp.rules.make_composite` keeps the
zennit composites as the reference (``tests/test_lrp_onepass.py`` compares every architecture).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facetool.errors import FacetoolError

STABILIZER = 1e-6


def stab(z: Tensor, eps: float) -> Tensor:
    """zennit's stabiliser: ``z + eps * sign(z)``, with sign(0) = +1 (the same values, in one pass)."""
    return torch.where(z >= 0., z + eps, z - eps)


# -- the linear map of a layer with given parameters, and its transpose ----------------------------


class _Ops:
    """Forward ``fwd(x, w, b)`` and input-VJP ``vjp(w, g)`` of a Conv2d or Linear (its geometry)."""

    def __init__(self, module: nn.Module, x: Tensor) -> None:
        self.shape = x.shape
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros":
                raise FacetoolError(f"LRP supports zero-padded convolutions only ({module.padding_mode!r} padding)")
            self.conv = (module.stride, module.padding, module.dilation, module.groups)
        elif isinstance(module, nn.Linear):
            self.conv = None
        else:
            raise FacetoolError(f"one-pass LRP has no rule for a {type(module).__name__} layer (Conv2d and Linear)")

    def fwd(self, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        if self.conv is None:
            return F.linear(x, w, b)
        return F.conv2d(x, w, b, *self.conv)

    def vjp(self, w: Tensor, g: Tensor) -> Tensor:
        if self.conv is None:
            return g.matmul(w)
        return torch.nn.grad.conv2d_input(self.shape, w, g, *self.conv)


def _params(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    b = getattr(module, "bias", None)
    return module.weight.detach(), (None if b is None else b.detach())


def _zeroed(b: Tensor | None, bias_free: bool) -> Tensor | None:
    return None if bias_free else b


def _clamp(b: Tensor | None, **kw) -> Tensor | None:
    return None if b is None else b.clamp(**kw)


# -- rules on linear layers ------------------------------------------------------------------------


class LinearRule:
    """A rule on a Conv2d/Linear: ``prepare`` runs in the forward (original output + what the backward
    needs), ``relevance`` in the backward (the rule's redistribution of the output relevance)."""

    def prepare(self, ops: _Ops, module: nn.Module, x: Tensor) -> tuple[Tensor, tuple]:
        raise NotImplementedError

    def relevance(self, ops: _Ops, state: tuple, r: Tensor) -> Tensor:
        raise NotImplementedError


class Epsilon(LinearRule):
    """``R_in = x * W^T (R / stab_eps(W x + b))`` (``b`` zeroed when bias-free)."""

    def __init__(self, epsilon: float = 1e-6, bias_free: bool = False) -> None:
        self.epsilon, self.bias_free = epsilon, bias_free

    def prepare(self, ops, module, x):
        w, b = _params(module)
        z = ops.fwd(x, w, b)
        zp = ops.fwd(x, w, None) if self.bias_free and b is not None else z
        return z, (x, w, stab(zp, self.epsilon))

    def relevance(self, ops, state, r):
        x, w, den = state
        return x * ops.vjp(w, r / den)


class ZPlus(LinearRule):
    """z+ (alpha 1, beta 0): ``z' = W+ x+ + b+ + W- x-``, ``R_in = x+ * W+^T s + x- * W-^T s``,
    ``s = R / stab(z')``. Non-negative inputs skip the (zero) ``x-`` branch."""

    def __init__(self, stabilizer: float = STABILIZER, bias_free: bool = False) -> None:
        self.stabilizer, self.bias_free = stabilizer, bias_free

    def prepare(self, ops, module, x):
        w, b = _params(module)
        z = ops.fwd(x, w, b)
        wp = w.clamp(min=0.)
        bp = _zeroed(_clamp(b, min=0.), self.bias_free)
        if bool((x >= 0).all()):
            return z, (x, None, wp, None, stab(ops.fwd(x, wp, bp), self.stabilizer))
        wn = w.clamp(max=0.)
        xp, xn = x.clamp(min=0.), x.clamp(max=0.)
        return z, (xp, xn, wp, wn, stab(ops.fwd(xp, wp, bp) + ops.fwd(xn, wn, None), self.stabilizer))

    def relevance(self, ops, state, r):
        xp, xn, wp, wn, den = state
        s = r / den
        if xn is None:
            return xp * ops.vjp(wp, s)
        return xp * ops.vjp(wp, s) + xn * ops.vjp(wn, s)


class AlphaBeta(LinearRule):
    """alpha-beta: positive contributions ``W+ x+ + W- x-`` weighted alpha, negative ``W- x+ + W+ x-`` beta."""

    def __init__(self, alpha: float = 2., beta: float = 1., stabilizer: float = STABILIZER,
                 bias_free: bool = False) -> None:
        self.alpha, self.beta, self.stabilizer, self.bias_free = alpha, beta, stabilizer, bias_free

    def prepare(self, ops, module, x):
        w, b = _params(module)
        z = ops.fwd(x, w, b)
        wp, wn = w.clamp(min=0.), w.clamp(max=0.)
        bp, bn = _zeroed(_clamp(b, min=0.), self.bias_free), _zeroed(_clamp(b, max=0.), self.bias_free)
        if bool((x >= 0).all()):
            d_pos, d_neg, xn = ops.fwd(x, wp, bp), ops.fwd(x, wn, bn), None
            xp = x
        else:
            xp, xn = x.clamp(min=0.), x.clamp(max=0.)
            d_pos = ops.fwd(xp, wp, bp) + ops.fwd(xn, wn, None)
            d_neg = ops.fwd(xp, wn, bn) + ops.fwd(xn, wp, None)
        return z, (xp, xn, wp, wn, stab(d_pos, self.stabilizer), stab(d_neg, self.stabilizer))

    def relevance(self, ops, state, r):
        xp, xn, wp, wn, den_pos, den_neg = state
        s_pos, s_neg = r / den_pos, r / den_neg
        if xn is None:
            return self.alpha * (xp * ops.vjp(wp, s_pos)) - self.beta * (xp * ops.vjp(wn, s_neg))
        return (self.alpha * (xp * ops.vjp(wp, s_pos) + xn * ops.vjp(wn, s_pos))
                - self.beta * (xp * ops.vjp(wn, s_neg) + xn * ops.vjp(wp, s_neg)))


class Gamma(LinearRule):
    """Generalised gamma: positive outputs explained by ``(W + g W+) x+ + (W + g W-) x-``, negative ones by
    ``(W + g W-) x+ + (W + g W+) x-`` (biases ``b + g b+`` / ``b + g b-`` on the ``x+`` terms)."""

    def __init__(self, gamma: float = 0.25, stabilizer: float = STABILIZER, bias_free: bool = False) -> None:
        self.gamma, self.stabilizer, self.bias_free = gamma, stabilizer, bias_free

    def prepare(self, ops, module, x):
        w, b = _params(module)
        z = ops.fwd(x, w, b)
        g = self.gamma
        w_up, w_dn = w + g * w.clamp(min=0.), w + g * w.clamp(max=0.)
        b_up = None if b is None or self.bias_free else b + g * b.clamp(min=0.)
        b_dn = None if b is None or self.bias_free else b + g * b.clamp(max=0.)
        if bool((x >= 0).all()):
            xp, xn = x, None
            d_pos, d_neg = ops.fwd(x, w_up, b_up), ops.fwd(x, w_dn, b_dn)
        else:
            xp, xn = x.clamp(min=0.), x.clamp(max=0.)
            d_pos = ops.fwd(xp, w_up, b_up) + ops.fwd(xn, w_dn, None)
            d_neg = ops.fwd(xp, w_dn, b_dn) + ops.fwd(xn, w_up, None)
        m_pos, m_neg = (z > 0.).to(z), (z < 0.).to(z)
        return z, (xp, xn, w_up, w_dn, m_pos / stab(d_pos, self.stabilizer), m_neg / stab(d_neg, self.stabilizer))

    def relevance(self, ops, state, r):
        xp, xn, w_up, w_dn, q_pos, q_neg = state
        s_pos, s_neg = r * q_pos, r * q_neg
        if xn is None:
            return xp * ops.vjp(w_up, s_pos) + xp * ops.vjp(w_dn, s_neg)
        return (xp * ops.vjp(w_up, s_pos) + xn * ops.vjp(w_dn, s_pos)
                + xp * ops.vjp(w_dn, s_neg) + xn * ops.vjp(w_up, s_neg))


class ZBox(LinearRule):
    """z^B for a bounded input ``low <= x <= high``: ``z' = W x + b - (W+ low + b+) - (W- high + b-)``,
    ``R_in = x * W^T s - (low * W+^T s + high * W-^T s)``."""

    def __init__(self, low: Tensor | float, high: Tensor | float, stabilizer: float = STABILIZER,
                 bias_free: bool = False) -> None:
        self.low, self.high, self.stabilizer, self.bias_free = low, high, stabilizer, bias_free

    def _bound(self, v: Tensor | float, x: Tensor) -> Tensor:
        from zennit.core import expand

        return expand(v, x.shape, cut_batch_dim=True).to(x)

    def prepare(self, ops, module, x):
        w, b = _params(module)
        z = ops.fwd(x, w, b)
        wp, wn = w.clamp(min=0.), w.clamp(max=0.)
        lo, hi = self._bound(self.low, x), self._bound(self.high, x)
        zp = z if not self.bias_free or b is None else ops.fwd(x, w, None)
        den = zp - (ops.fwd(lo, wp, _zeroed(_clamp(b, min=0.), self.bias_free))
                    + ops.fwd(hi, wn, _zeroed(_clamp(b, max=0.), self.bias_free)))
        return z, (x, lo, hi, w, wp, wn, stab(den, self.stabilizer))

    def relevance(self, ops, state, r):
        x, lo, hi, w, wp, wn, den = state
        s = r / den
        return x * ops.vjp(w, s) - (lo * ops.vjp(wp, s) + hi * ops.vjp(wn, s))


class Flat(LinearRule):
    """flat: every weight 1, every input 1, no bias: ``R_in = 1^T (R / stab(1 1))`` (spread over the
    receptive field whatever the pixel values)."""

    def __init__(self, stabilizer: float = STABILIZER) -> None:
        self.stabilizer = stabilizer

    def prepare(self, ops, module, x):
        w, b = _params(module)
        z = ops.fwd(x, w, b)
        if ops.conv is not None and ops.conv[3] == 1:
            # every output channel of every image sees the same count of ones: one channel of one image
            one = x.new_ones(1, x.shape[1], *x.shape[2:])
            kernel = w.new_ones(1, w.shape[1], *w.shape[2:])
            den = stab(F.conv2d(one, kernel, None, *ops.conv), self.stabilizer)
            return z, (True, kernel[:, :1], den)
        ones_w = torch.ones_like(w)
        return z, (False, ones_w, stab(ops.fwd(torch.ones_like(x), ones_w, None), self.stabilizer))

    def relevance(self, ops, state, r):
        shared, kernel, den = state
        if shared:  # sum over output channels first, then one single-channel transpose, the same for every input channel
            g = (r / den).sum(1, keepdim=True)
            shape = (ops.shape[0], 1, *ops.shape[2:])
            return torch.nn.grad.conv2d_input(shape, kernel, g, *ops.conv[:3]).expand(ops.shape)
        return ops.vjp(kernel, r / den)


class _RuleFunction(torch.autograd.Function):
    """Forward: the layer's original output; backward: the rule's relevance (one product per branch)."""

    @staticmethod
    def forward(ctx, x: Tensor, module: nn.Module, rule: LinearRule) -> Tensor:  # type: ignore[override]
        ops = _Ops(module, x)
        z, state = rule.prepare(ops, module, x)
        ctx.ops, ctx.rule, ctx.state = ops, rule, state
        return z

    @staticmethod
    def backward(ctx, r: Tensor):  # type: ignore[override]
        rel = ctx.rule.relevance(ctx.ops, ctx.state, r)
        ctx.state = None
        return rel, None, None


# -- parameter-free rules: stop-gradient form ------------------------------------------------------


class _SumFunction(torch.autograd.Function):
    """Norm on a ``Sum`` over ``dim``: forward the sum, backward ``x * R / stab(sum)`` for every term."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, stabilizer: float) -> Tensor:  # type: ignore[override]
        y = torch.sum(x, dim=dim)
        ctx.dim, ctx.x, ctx.den = dim, x, stab(y, stabilizer)
        return y

    @staticmethod
    def backward(ctx, r: Tensor):  # type: ignore[override]
        rel = ctx.x * (r / ctx.den).unsqueeze(ctx.dim)
        ctx.x = ctx.den = None
        return rel, None, None


class Norm:
    """Norm (residual ``Sum`` modules, average pooling): ``R_in = x * J^T (R / stab(y))``. A ``Sum`` as a
    function with that product; otherwise the stop-gradient form ``sg(y) + f - sg(f)`` with
    ``f = module(x * sg(x)) / sg(stab(y))``."""

    def __init__(self, stabilizer: float = STABILIZER) -> None:
        self.stabilizer = stabilizer

    def __call__(self, forward: Callable[[Tensor], Tensor], x: Tensor, module: nn.Module) -> Tensor:
        from zennit.layer import Sum

        if type(module) is Sum:
            return _SumFunction.apply(x, module.dim, self.stabilizer)
        y = forward(x)
        den = stab(y, self.stabilizer).detach()
        f = forward(x * x.detach()) / den
        return y.detach() + (f - f.detach())


def _plain_activation(module: nn.Module, inner: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """The activation without its in-place option (a ReLU as ``torch.relu``; others on a copy)."""
    if type(module) is nn.ReLU:
        return torch.relu
    if getattr(module, "inplace", False):
        return lambda x: inner(x.clone())
    return inner


class _PassFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, forward: Callable[[Tensor], Tensor]) -> Tensor:  # type: ignore[override]
        return forward(x)

    @staticmethod
    def backward(ctx, r: Tensor):  # type: ignore[override]
        return r, None


class Pass:
    """Pass (activations, merged BatchNorms): the module's output, the relevance passed on unchanged."""

    def __call__(self, forward: Callable[[Tensor], Tensor], x: Tensor, module: nn.Module) -> Tensor:
        return _PassFunction.apply(x, _plain_activation(module, forward))


# -- composites: which rule on which module (zennit's layer maps) ----------------------------------


def layer_maps(method: str, bounds: tuple[Tensor, Tensor] | None = None, bias_free: bool = False,
               epsilon: float = 1e-6, stabilizer: float = STABILIZER) -> tuple[list, list]:
    """``(first_map, layer_map)`` of zennit's composite for ``method`` (``lrp`` EpsilonPlusFlat, ``lrp-gamma``
    EpsilonGammaBox with ``bounds`` = (low, high), ``lrp-ab`` EpsilonAlpha2Beta1, ``lrp-epsilon``): lists of
    (module types, rule); the first module (in ``named_modules`` order) matching ``first_map`` takes that rule."""
    from zennit.layer import Sum
    from zennit.types import Activation, AvgPool, BatchNorm, Convolution, Linear

    base = [(Activation, Pass()), (Sum, Norm(stabilizer)), (AvgPool, Norm(stabilizer)), (BatchNorm, Pass())]
    linear = (nn.Linear, Epsilon(epsilon, bias_free))
    if method == "lrp":
        return [(Linear, Flat(stabilizer))], base + [(Convolution, ZPlus(stabilizer, bias_free)), linear]
    if method == "lrp-gamma":
        low, high = bounds
        return ([(Convolution, ZBox(low, high, stabilizer, bias_free))],
                base + [(Convolution, Gamma(0.25, stabilizer, bias_free)), linear])
    if method == "lrp-ab":
        return [], base + [(Convolution, AlphaBeta(2., 1., stabilizer, bias_free)), linear]
    if method != "lrp-epsilon":
        raise FacetoolError(f"unknown LRP method {method!r}")
    return [], base + [((Convolution, nn.Linear), Epsilon(epsilon, bias_free))]


def _rule_forward(module: nn.Module, rule, inner: Callable[[Tensor], Tensor]) -> Callable:
    """The temporary ``forward`` of a module carrying ``rule`` (plain ``inner`` where no gradient flows)."""

    def forward(x: Tensor, *args, **kwargs) -> Tensor:
        if args or kwargs or not (torch.is_grad_enabled() and x.requires_grad):
            return inner(x, *args, **kwargs)
        if isinstance(rule, LinearRule):
            return _RuleFunction.apply(x, module, rule)
        return rule(inner, x, module)

    return forward


@contextlib.contextmanager
def rules_attached(model: nn.Module, first_map: list, layer_map: list) -> Iterator[nn.Module]:
    """Each module's rule attached as a temporary ``forward`` (the one-pass form), restored on exit.
    Call after the canonizers are applied: their temporary modules take rules too, as in zennit."""
    attached: list[tuple[nn.Module, object]] = []
    first_done = False
    try:
        for _, module in model.named_modules():
            rule = None
            if not first_done:
                rule = next((r for types, r in first_map if isinstance(module, types)), None)
                first_done = rule is not None
            if rule is None:
                rule = next((r for types, r in layer_map if isinstance(module, types)), None)
            if rule is None:
                continue
            had = vars(module).get("forward")
            inner = had if had is not None else type(module).forward.__get__(module)
            attached.append((module, had))
            module.forward = _rule_forward(module, rule, inner)
        yield model
    finally:
        for module, had in reversed(attached):
            if had is None:
                del module.forward
            else:
                module.forward = had
