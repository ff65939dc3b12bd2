"""Dynamic convolutions (CondFace, thesis ch. 5): kernels chosen per image by a routing network.

* :class:`DynamicConv2d` (Eq. 5.2): ``n`` expert kernels ``W_i``; ``alpha = softmax(MLP(GAP(x)) / T)``
  per sample and ``O = (sum_i alpha_i W_i) (x) x`` (DyConv; the MLP as kaijieshi7's ``dynamic_conv.py``:
  1x1 ``in -> max(4, reduction * in)`` without bias -> ReLU -> 1x1 ``-> n``).
* :class:`DynamicGroupConv2d` (Eq. 5.3): the input channels in ``m`` groups ``x^k``, each with its own
  ``n`` experts; ``alpha`` is (B, m, n), ``W^k = sum_i alpha_i^k W_i^k`` and ``O = concat_k W^k (x) x^k``.

Both run as ONE grouped convolution over the batch: ``x`` viewed as (1, B*C, H, W), the per-sample
aggregated kernels stacked to (B*out, in/groups, k, k), ``groups = B*groups`` -- no loop over samples,
any batch size, train and eval, CPU and CUDA, under autocast. ONNX freezes a ``groups`` attribute at
the traced batch (onnx#3843), so under ``torch.onnx.export`` the layers use the expert-sum form instead,
``O = sum_i alpha_i (W_i (x) x)`` (the convolution is linear in its kernel: the same result up to rounding,
``n`` times the convolution work, batch-dynamic).

Each layer keeps its last routing vector ``routing`` (B, D) (D = n, or m*n) for the model's internals;
a layer built with ``router=False`` has no routing network and takes ``alpha`` from its caller (routing
shared by the convolutions of one block). ``set_temperature(t)`` sets T (DyConv anneals it 30 -> 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from facetool.errors import FacetoolError


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class Router(nn.Module):
    """``softmax(MLP(GAP(x)) / T)`` over ``experts`` per group: (B, C, H, W) -> (B, groups, experts)."""

    def __init__(self, in_ch: int, experts: int, groups: int = 1, reduction: float = 0.25) -> None:
        super().__init__()
        hidden = max(4, int(in_ch * reduction))
        self.experts, self.groups = experts, groups
        self.fc1 = nn.Conv2d(in_ch, hidden, 1, bias=False)
        self.fc2 = nn.Conv2d(hidden, groups * experts, 1)
        self.temperature = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1))))
        z = z.reshape(x.shape[0], self.groups, self.experts).float()
        return torch.softmax(z / self.temperature, dim=-1)


class _Dynamic(nn.Module):
    """Shared mechanics: the weight (m, n, out/m, in/(m*groups), k, k), routing, the two forward forms."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size, stride, padding, experts: int, groups: int,
                 groups_m: int, bias: bool, reduction: float, temperature: float, router: bool) -> None:
        super().__init__()
        g = groups * groups_m
        if experts < 1 or groups < 1 or groups_m < 1:
            raise FacetoolError(f"experts, groups and groups_m must be >= 1, got {experts}, {groups}, {groups_m}")
        if in_ch % g or out_ch % g:
            raise FacetoolError(f"in_ch {in_ch} and out_ch {out_ch} must be divisible by the {g} channel groups")
        if not temperature > 0:
            raise FacetoolError(f"routing temperature must be > 0, got {temperature}")
        self.in_ch, self.out_ch, self.experts, self.groups, self.groups_m = in_ch, out_ch, experts, groups, groups_m
        self.kernel_size, self.stride, self.padding = _pair(kernel_size), _pair(stride), _pair(padding)
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(groups_m, experts, out_ch // groups_m, in_ch // g, kh, kw))
        self.bias = nn.Parameter(torch.zeros(groups_m, experts, out_ch // groups_m)) if bias else None
        self.router = Router(in_ch, experts, groups_m, reduction) if router else None
        self.temperature = float(temperature)
        self.routing: torch.Tensor | None = None
        for i in range(groups_m):
            for j in range(experts):
                nn.init.kaiming_uniform_(self.weight[i, j], a=math.sqrt(5))

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, t: float) -> None:
        self._temperature = float(t)
        if getattr(self, "router", None) is not None:
            self.router.temperature = float(t)

    def set_temperature(self, t: float) -> None:
        """Routing softmax temperature T (alpha = softmax(z / T)); > 0."""
        if not t > 0:
            raise FacetoolError(f"routing temperature must be > 0, got {t}")
        self.temperature = t

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """(B, m, n) routing weights of ``x`` (rows sum to 1)."""
        if self.router is None:
            raise RuntimeError("this dynamic layer shares its block's routing: pass alpha")
        return self.router(x)

    def aggregated_weight(self, alpha: torch.Tensor) -> torch.Tensor:
        """(B, out, in/(m*groups), k, k): each sample's kernel, each group's from its own experts."""
        b = alpha.shape[0]
        w = self.weight.flatten(2)  # (m, n, P)
        agg = torch.einsum("bmn,mnp->bmp", alpha.to(w.dtype), w)
        return agg.reshape(b, self.out_ch, *self.weight.shape[3:])

    def aggregated_bias(self, alpha: torch.Tensor) -> torch.Tensor | None:
        if self.bias is None:
            return None
        return torch.einsum("bmn,mno->bmo", alpha.to(self.bias.dtype), self.bias).reshape(alpha.shape[0], -1)

    def forward(self, x: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        if alpha is None:
            alpha = self.route(x)
        alpha = alpha.reshape(x.shape[0], self.groups_m, self.experts)
        self.routing = alpha.reshape(x.shape[0], -1)
        if torch.onnx.is_in_onnx_export():
            return self._expert_sum(x, alpha)
        return self._batched(x, alpha)

    def _batched(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """One grouped convolution over the batch with the per-sample aggregated kernels."""
        b, c, h, w = x.shape
        weight = self.aggregated_weight(alpha).flatten(0, 1)
        bias = self.aggregated_bias(alpha)
        out = F.conv2d(x.reshape(1, b * c, h, w), weight, None if bias is None else bias.flatten(),
                       self.stride, self.padding, groups=b * self.groups * self.groups_m)
        return out.reshape(b, self.out_ch, out.shape[-2], out.shape[-1])

    def _expert_sum(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """sum_i alpha_i (W_i (x) x): batch-dynamic in ONNX (no groups=B), n times the convolution work."""
        m, n, og = self.groups_m, self.experts, self.out_ch // self.groups_m
        g = self.groups
        # (m, n, out/m, ...) -> output channels ordered (m, groups, n, out/(m*groups)) for a conv with m*groups groups
        w = self.weight.reshape(m, n, g, og // g, *self.weight.shape[3:]).transpose(1, 2)
        y = F.conv2d(x, w.reshape(m * g * n * (og // g), *self.weight.shape[3:]), None, self.stride, self.padding,
                     groups=m * g)
        y = y.reshape(x.shape[0], m, g, n, og // g, y.shape[-2], y.shape[-1])
        y = (y * alpha.to(y.dtype).reshape(x.shape[0], m, 1, n, 1, 1, 1)).sum(3)
        y = y.reshape(x.shape[0], self.out_ch, y.shape[-2], y.shape[-1])
        bias = self.aggregated_bias(alpha)
        return y if bias is None else y + bias.to(y.dtype)[:, :, None, None]

    def extra_repr(self) -> str:
        return (f"{self.in_ch}, {self.out_ch}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, experts={self.experts}, groups={self.groups}, groups_m={self.groups_m}, "
                f"bias={self.bias is not None}, router={self.router is not None}, temperature={self.temperature:g}")


class DynamicConv2d(_Dynamic):
    """DyConv (Eq. 5.2): ``experts`` kernels mixed per sample by ``alpha = softmax(MLP(GAP(x)) / T)``;
    ``routing`` is (B, experts). ``router=False``: no routing network, ``forward(x, alpha)``."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size, stride=1, padding=0, experts: int = 4, groups: int = 1,
                 bias: bool = False, reduction: float = 0.25, temperature: float = 1.0, router: bool = True) -> None:
        super().__init__(in_ch, out_ch, kernel_size, stride, padding, experts, groups, 1, bias, reduction,
                         temperature, router)


class DynamicGroupConv2d(_Dynamic):
    """DGConv (Eq. 5.3): ``groups_m`` input-channel groups, each with ``experts`` kernels mixed by its own
    softmax; the groups' outputs concatenated. One routing network on GAP(x) gives all m*n logits;
    ``routing`` is (B, m*n), each group's slice of n summing to 1."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size, stride=1, padding=0, groups_m: int = 4,
                 experts: int = 4, bias: bool = False, reduction: float = 0.25, temperature: float = 1.0,
                 router: bool = True) -> None:
        super().__init__(in_ch, out_ch, kernel_size, stride, padding, experts, 1, groups_m, bias, reduction,
                         temperature, router)


def dynamic_layers(model: nn.Module) -> list[_Dynamic]:
    """The dynamic convolutions of ``model``, in registration (forward) order."""
    return [m for m in model.modules() if isinstance(m, _Dynamic)]


def set_routing_temperature(model: nn.Module, t: float) -> None:
    """Set the routing temperature of ``model`` (its own ``set_temperature`` where it has one, e.g. a
    CondFace model whose blocks share routing networks; else every dynamic layer's)."""
    own = getattr(model, "set_temperature", None)
    if callable(own):
        own(t)
        return
    for m in dynamic_layers(model):
        m.set_temperature(t)
