"""CondFace (thesis ch. 5): routing vectors that cluster by facial attributes.

* :func:`sinkhorn`: SwAV's equipartitioned soft assignment of a batch of routing scores to P prototypes
  (the "Sinkhorn" clustering of Eq. 5.5).
* :class:`CondFaceMethod`: train arcface's method (:class:`~facetool.trainers.arcface.ArcFaceMethod`,
  CosFace by default: L_fr of Eq. 5.4) plus, per epoch, the routing softmax temperature (a linear
  START:END schedule, DyConv-style) and, with ``clustering="sinkhorn"``, lambda * L_cls (Eqs. 5.5-5.6):
  a cluster head on the routing vector beta, L2-normalised, scored against P trainable L2-normalised
  prototypes; cross-entropy of softmax(scores / 0.1) to the Sinkhorn targets (epsilon 0.05, 3 iterations,
  float32, no gradient), SwAV with a single view (no swapped prediction). With ``clustering="kmeans"``
  (DeepCluster-v2, the thesis's AS5 = CondFace): a per-rank memory bank of the epoch's L2-normalised
  cluster-head outputs (with their store rows), spherical k-means over all of them at the epoch's end
  (:func:`spherical_kmeans`, sums all-reduced under DDP), and in the next epoch cross-entropy of
  (z . centroids) / 0.1 to the item's k-means assignment, the centroids frozen. The first epoch has no
  centroids yet and trains L_fr alone (it fills the bank: the same cost as a k-means pass before it,
  without a second loop over the data outside the engine; with a pretrained model the thesis's
  fine-tuning starts from, its first epoch is that pass).
* :func:`train_condface`: train arcface's recipe (:func:`~facetool.trainers.arcface.train_arcface`) on a
  CondFace model (``condface_dc_ir*`` / ``condface_ir*``, :mod:`facetool.models.condface`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facetool.distributed import all_reduce
from facetool.errors import FacetoolError
from facetool.trainers.arcface import ArcFaceMethod

#: --variant -> the model name prefix (facetool.models.condface)
VARIANTS = {"dc": "condface_dc_ir", "dgconv": "condface_ir"}
CLUSTERINGS = ("none", "sinkhorn", "kmeans")
CLUSTER_HEADS = ("identity", "linear", "mlp")
#: SwAV's constants: scores / 0.1 in the cross-entropy, Sinkhorn epsilon 0.05 and 3 iterations
SCORE_TEMPERATURE, SINKHORN_EPSILON, SINKHORN_ITERATIONS = 0.1, 0.05, 3
#: DeepCluster-v2's E/M iterations per k-means; the CE target of an item k-means never saw
KMEANS_ITERATIONS, IGNORE = 10, -100


@torch.no_grad()
def sinkhorn(scores: Any, epsilon: float = 0.05, iterations: int = 3, group: Any = None) -> Any:
    """Soft assignments (B, K) of B samples to K prototypes from their scores (B, K), rows summing to 1.

    SwAV's ``distributed_sinkhorn`` on this process's rows: Q = exp(scores / epsilon).T normalised to
    total 1, then ``iterations`` rounds of prototype (row) sums -> 1/K and sample (column) sums -> 1/B,
    and Q * B transposed. Under DDP the total and the prototype sums are all-reduced over ``group``
    (default: the whole job) and B counts every rank's samples, as in SwAV; in one process nothing is
    communicated. After finitely many iterations the per-prototype mass is only about B/K (the
    equipartition is soft); every row sums exactly to 1.

    Computed in float32 at least (float64 stays float64): exp(s / 0.05) overflows float16 for s > 0.55.
    One global maximum (all-reduced under DDP) is subtracted first, which changes nothing because every
    normalisation divides it out; a per-sample maximum would change Q. Scores are meant to be cosine
    similarities (SwAV L2-normalises features and prototypes, so |s| <= 1). A tensor in gives a tensor
    out (on its device), anything else a numpy array.
    """
    is_tensor = isinstance(scores, torch.Tensor)
    s = scores.detach() if is_tensor else torch.as_tensor(np.asarray(scores, dtype=np.float64))
    if s.ndim != 2 or s.shape[0] < 1 or s.shape[1] < 1:
        raise FacetoolError(f"sinkhorn needs a B x K score matrix with B, K >= 1, got shape {tuple(s.shape)}")
    if not (isinstance(epsilon, (int, float)) and 0 < epsilon < float("inf")):
        raise FacetoolError(f"sinkhorn epsilon must be a positive finite number, got {epsilon!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise FacetoolError(f"sinkhorn iterations must be an integer >= 1, got {iterations!r}")
    s = s.to(torch.float64 if s.dtype == torch.float64 else torch.float32)
    if not bool(torch.isfinite(s).all()):
        raise FacetoolError("sinkhorn scores must be finite (found NaN or infinity)")

    top = all_reduce(s.max().reshape(1).clone(), "max", group)  # ONE global scalar: exact under every normalisation
    q = torch.exp((s - top) / epsilon).t()  # K x B, as in SwAV
    b = torch.tensor(float(q.shape[1]), dtype=q.dtype, device=q.device)
    b = all_reduce(b, "sum", group)  # samples of every rank
    k = q.shape[0]
    q /= all_reduce(q.sum().reshape(1), "sum", group)
    for _ in range(iterations):
        q /= all_reduce(q.sum(dim=1, keepdim=True), "sum", group)  # each prototype's mass -> 1/K
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # each sample's mass -> 1/B
        q /= b
    q *= b  # columns sum to 1: an assignment per sample
    out = q.t().contiguous()
    return out if is_tensor else out.numpy()


@torch.no_grad()
def spherical_kmeans(vectors: torch.Tensor, k: int, iterations: int = KMEANS_ITERATIONS,
                     generator: torch.Generator | None = None, group: Any = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spherical k-means of DeepCluster-v2 (swav ``cluster_memory``) over every rank's rows.

    ``vectors`` (n, D) are this rank's rows (L2-normalised here). Initial centroids: ``k`` random rows of
    rank 0 (``generator``; with replacement when rank 0 has fewer than k rows), sent to every rank; then
    ``iterations`` rounds of assignment to the nearest centroid (largest cosine) and centroid = L2-normalised
    mean of its rows, the per-centroid sums and counts all-reduced over ``group``, so the result equals
    one process's k-means on all rows; a centroid that gets no rows keeps its place. Returns the centroids
    (k, D) float32, this rank's assignments (n,) to the final centroids, and the clusters' sizes (k,)
    over all ranks. The sums are float64 (the same up to rounding whatever the split)."""
    from facetool.distributed import rank

    x = F.normalize(vectors.detach().float(), dim=1)
    n, d = x.shape
    cent = torch.zeros(k, d, device=x.device)
    if rank() == 0:
        if n == 0:
            raise FacetoolError("k-means: rank 0 has no vectors to start from")
        pick = torch.randperm(n, generator=generator)[:k] if n >= k else torch.randint(n, (k,), generator=generator)
        cent = x[pick.to(x.device)].clone()
    cent = all_reduce(cent, "sum", group)  # a broadcast: the other ranks add zeros
    assign = torch.zeros(0, dtype=torch.long, device=x.device)
    for it in range(iterations + 1):
        assign = (x @ cent.t()).argmax(1)
        if it == iterations:
            break
        sums = torch.zeros(k, d, dtype=torch.float64, device=x.device).index_add_(0, assign, x.double())
        counts = torch.bincount(assign, minlength=k).double()
        all_reduce(sums, "sum", group)
        all_reduce(counts, "sum", group)
        full = counts > 0  # empty clusters keep their centroid
        cent[full] = (sums[full] / counts[full, None]).float()
        cent = F.normalize(cent, dim=1)
    counts = all_reduce(torch.bincount(assign, minlength=k), "sum", group)
    return cent, assign, counts


class KMeansClassifier(nn.Module):
    """The frozen classifier of k-means clustering: the centroids (P, D) and every training item's
    assignment (indexed by store row; ``IGNORE`` where k-means did not see it) as buffers, so that they
    are saved with the method's modules (``heads.pt``, the resume state) and restored on resume."""

    def __init__(self, prototypes: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("centroids", torch.zeros(prototypes, dim))
        self.register_buffer("assignments", torch.zeros(0, dtype=torch.long))

    @property
    def ready(self) -> bool:
        return self.assignments.numel() > 0

    def set(self, centroids: torch.Tensor, assignments: torch.Tensor) -> None:
        self.centroids = centroids.detach().to(self.centroids)
        self.assignments = assignments.detach().to(device=self.centroids.device, dtype=torch.long)

    def targets(self, index: torch.Tensor) -> torch.Tensor:
        """The assignments of store rows ``index``; ``IGNORE`` for a row k-means did not see."""
        idx = index.to(self.assignments.device).long()
        inside = idx < self.assignments.numel()
        out = torch.full_like(idx, IGNORE)
        out[inside] = self.assignments[idx[inside]]
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # the assignments' length varies
        key = prefix + "assignments"
        if key in state_dict:
            self.assignments = torch.zeros_like(state_dict[key], device=self.centroids.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def parse_temperature(text: str | None) -> tuple[float, float] | None:
    """``--routing-temperature START:END`` (two positive numbers; ``""`` = the model's own, 1) -> (start, end)."""
    if not text:
        return None
    parts = text.split(":")
    try:
        t = tuple(float(v) for v in parts)
    except ValueError:
        t = ()
    if len(t) != 2 or not all(math.isfinite(v) and 0 < v <= 1000 for v in t):
        raise FacetoolError(f"--routing-temperature needs START:END, two positive numbers up to 1000 "
                            f"(e.g. 30:1), got {text!r}")
    return t  # type: ignore[return-value]


def temperature_at(schedule: tuple[float, float], epoch: int, epochs: int) -> float:
    """The routing temperature of ``epoch`` (0-based): START in the first epoch, END in the last, linear
    in between."""
    start, end = schedule
    return start if epochs <= 1 else start + (end - start) * min(epoch, epochs - 1) / (epochs - 1)


def cluster_head(kind: str, dim: int) -> nn.Module:
    """p of Eq. 5.5 on the routing vector (dim -> dim): identity, linear, or SwAV's MLP (Linear -> BN ->
    ReLU -> Linear)."""
    if kind == "identity":
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(dim, dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))
    raise FacetoolError(f"unknown --cluster-head {kind!r}; choose one of {', '.join(CLUSTER_HEADS)}")


class CondFaceMethod(ArcFaceMethod):
    """CondFace training: the margin loss of :class:`ArcFaceMethod` + a routing temperature schedule +
    (``clustering="sinkhorn"``) lambda * the prototype loss on the routing vectors."""

    name = "condface"

    def __init__(self, num_classes: int, embedding_size: int, *, routing_dim: int, loss: str = "cosface",
                 clustering: str = "none", prototypes: int = 300, head: str = "mlp", lam: float = 1.0,
                 temperature: tuple[float, float] | None = None, epochs: int = 1, **arcface: Any) -> None:
        if clustering not in CLUSTERINGS:
            raise FacetoolError(f"unknown --clustering {clustering!r}; choose one of {', '.join(CLUSTERINGS)}")
        if isinstance(prototypes, bool) or not isinstance(prototypes, int) or prototypes < 2:
            raise FacetoolError(f"--prototypes must be an integer >= 2, got {prototypes!r}")
        if not (math.isfinite(lam) and lam >= 0):
            raise FacetoolError(f"--lambda must be a finite number >= 0, got {lam}")
        super().__init__(num_classes, embedding_size, loss, **arcface)
        self.clustering, self.num_prototypes, self.head_kind, self.lam = clustering, prototypes, head, float(lam)
        self.temperature, self.epochs, self.routing_dim = temperature, epochs, routing_dim
        self.cluster_head: nn.Module | None = None
        self.prototypes: nn.Linear | None = None
        self.kmeans: KMeansClassifier | None = None
        if clustering == "sinkhorn":
            self.cluster_head = cluster_head(head, routing_dim)
            self.prototypes = nn.Linear(routing_dim, prototypes, bias=False)
        elif clustering == "kmeans":
            self.cluster_head = cluster_head(head, routing_dim)
            self.kmeans = KMeansClassifier(prototypes, routing_dim)
        self._warned = False
        self._bank: list[tuple[torch.Tensor, torch.Tensor]] = []  # this rank's (store rows, z) of the epoch
        self._kmeans_stats: dict[str, float] = {}

    def modules(self) -> dict[str, nn.Module]:
        mods = super().modules()
        if self.prototypes is not None:
            mods.update({"cluster_head": self.cluster_head, "prototypes": self.prototypes})
        if self.kmeans is not None:
            mods.update({"cluster_head": self.cluster_head, "centroids": self.kmeans})
        return mods

    def start_epoch(self, model: nn.Module, epoch: int) -> None:
        if self.temperature is not None:
            model.set_temperature(temperature_at(self.temperature, epoch, self.epochs))

    def embed(self, routing: torch.Tensor) -> torch.Tensor:
        """z: the L2-normalised cluster-head output of the routing vectors, in float32."""
        with torch.autocast(routing.device.type, enabled=False):
            return F.normalize(self.cluster_head(routing.float()), dim=1)

    def scores(self, routing: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Cosines (B, P) of the L2-normalised cluster-head outputs and prototypes (k-means: the frozen
        centroids), in float32."""
        z = self.embed(routing) if z is None else z
        with torch.autocast(routing.device.type, enabled=False):
            if self.kmeans is not None:
                return z @ self.kmeans.centroids.t()
            return z @ F.normalize(self.prototypes.weight.float(), dim=1).t()

    def kmeans_loss(self, model: nn.Module, batch: dict, routing: torch.Tensor) -> torch.Tensor:
        """L_cls with k-means pseudo-labels: CE((z . centroids) / 0.1, the item's assignment of the last
        k-means); 0 (still a graph, so every rank's head gets a gradient under DDP) before the first
        k-means and for items it did not see. In training, z joins this rank's memory bank."""
        z = self.embed(routing)
        if model.training:
            self._bank.append((batch["index"].detach().reshape(-1).long(), z.detach()))
        s = self.scores(routing, z)
        target = self.kmeans.targets(batch["index"]) if self.kmeans.ready else torch.full(
            (s.shape[0],), IGNORE, dtype=torch.long, device=s.device)
        valid = target != IGNORE
        if not bool(valid.any()):
            return s.sum() * 0.0
        return F.cross_entropy(s[valid] / SCORE_TEMPERATURE, target[valid].to(s.device))

    def on_epoch_end(self, ctx: Any) -> None:
        """k-means over the epoch's memory bank (every rank's, sums all-reduced); its centroids and the
        items' assignments become the frozen classifier of the next epoch. The initial rows are drawn
        from (seed, epoch), outside the training RNG stream."""
        if self.kmeans is None:
            return
        device = ctx.device
        idx = torch.cat([i.to(device) for i, _ in self._bank]) if self._bank else torch.zeros(
            0, dtype=torch.long, device=device)
        z = torch.cat([v.to(device) for _, v in self._bank]) if self._bank else torch.zeros(
            0, self.routing_dim, device=device)
        gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + ctx.epoch)
        cent, assign, counts = spherical_kmeans(z, self.num_prototypes, KMEANS_ITERATIONS, gen)
        rows = all_reduce(torch.tensor([int(idx.max()) + 1 if len(idx) else 0], device=device), "max")
        table = torch.zeros(int(rows), dtype=torch.long, device=device)
        table.scatter_reduce_(0, idx, assign + 1, "amax")  # an item seen twice (sampler padding): one answer
        all_reduce(table, "max")
        self.kmeans.set(cent, torch.where(table > 0, table - 1, torch.full_like(table, IGNORE)))
        self._bank = []
        total = float(counts.sum())
        self._kmeans_stats = {"kmeans_clusters": float((counts > 0).sum()),
                              "kmeans_largest": float(counts.max()) / max(total, 1.0)}

    def resume_state(self) -> dict[str, Any]:
        if self.kmeans is None or not self._bank:
            return {}
        return {"bank_index": torch.cat([i for i, _ in self._bank]).cpu(),
                "bank_z": torch.cat([v for _, v in self._bank]).cpu()}

    def load_resume_state(self, states: list[dict[str, Any]], rank: int, world: int) -> None:
        """Each rank its own bank; with another number of processes rank 0 takes all rows (k-means sums
        over ranks, so where the rows are does not matter)."""
        if self.kmeans is None:
            return
        mine = [states[rank]] if len(states) == world else (states if rank == 0 else [])
        self._bank = [(st["bank_index"], st["bank_z"]) for st in mine if st and "bank_index" in st]

    def evaluate(self, model, epoch):
        return {**super().evaluate(model, epoch), **self._kmeans_stats}

    def cluster_loss(self, routing: torch.Tensor) -> torch.Tensor:
        """L_cls (Eq. 5.5): cross-entropy of softmax(scores / 0.1) to the Sinkhorn assignments of the batch."""
        if routing.shape[0] < self.num_prototypes and not self._warned:
            self._warned = True
            from facetool.console import err_console
            from facetool.distributed import is_main

            if is_main():
                err_console.print(f"note: batches of {routing.shape[0]} routing vectors are smaller than --prototypes "
                                  f"{self.num_prototypes}: some prototypes get no mass in a batch (swav#42)",
                                  highlight=False, soft_wrap=True, markup=False)
        s = self.scores(routing)
        q = sinkhorn(s, SINKHORN_EPSILON, SINKHORN_ITERATIONS)
        return -(q * F.log_softmax(s / SCORE_TEMPERATURE, dim=1)).sum(1).mean()

    def loss(self, model, batch, out, internals):
        terms = super().loss(model, batch, out, internals)
        if self.prototypes is not None:
            terms["cls"] = self.lam * self.cluster_loss(internals["routing"])
        elif self.kmeans is not None:
            terms["cls"] = self.lam * self.kmeans_loss(model, batch, internals["routing"])
        return terms

    def metrics(self, batch, out, internals):
        row = super().metrics(batch, out, internals)
        if self.prototypes is not None or (self.kmeans is not None and self.kmeans.ready):
            with torch.no_grad():
                used = self.scores(internals["routing"]).argmax(1).unique().numel()
            row["protos_used"] = float(used)  # distinct prototypes the batch's argmax picks (collapse -> 1)
        return row

    def meta(self) -> dict:
        return {**super().meta(), "clustering": self.clustering, "routing_dim": self.routing_dim,
                "routing_temperature": list(self.temperature) if self.temperature else None,
                **({"prototypes": self.num_prototypes, "cluster_head": self.head_kind, "lambda": self.lam}
                   if self.clustering != "none" else {})}


def routing_dim(model: nn.Module) -> int:
    """|beta|: the sum of the routing blocks' groups x experts (24 for DC IR-18, 96 for AS4 IR-18)."""
    return sum(b.router.groups * b.router.experts for b in model.routing_blocks())


def condface_network(variant: str, network: str) -> str:
    """The CondFace model of ``--variant`` at the depth of the IR-ResNet ``--network`` (r18 -> condface_ir18)."""
    from facetool.models.iresnet import LAYERS
    from facetool.trainers.arcface import resolve_network

    if variant not in VARIANTS:
        raise FacetoolError(f"unknown --variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    name = resolve_network(network)
    depth = name.removeprefix("iresnet")
    if not name.startswith("iresnet") or not depth.isdigit() or int(depth) not in LAYERS:
        raise FacetoolError(f"--network {network!r}: CondFace models are IR-ResNets; use "
                            + "/".join(f"r{d}" for d in LAYERS))
    return f"{VARIANTS[variant]}{depth}"


def _geometry(sd: dict) -> tuple[str, dict] | None:
    """(kind, facts) of an IR-ResNet-layout state_dict: kind "dc" / "dgconv" (CondFace) or "bl" (plain
    IR-ResNet); facts depth, width, embedding and input size (and CondFace's groups and experts)."""
    from facetool.models.iresnet import ir_geometry

    if not all(k in sd for k in ("conv1.weight", "fc.weight")):
        return None
    geometry = ir_geometry(sd)
    if geometry is None:
        return None
    depth, kw = geometry
    facts = {"depth": depth, "width": int(kw.get("width", 64)), "embedding_size": int(kw["embedding_size"]),
             "input_size": int(kw["input_size"])}
    if "layer2.0.router.fc1.weight" in sd:
        kind = "dgconv" if "layer2.0.project.weight" in sd else "dc"
        m, n = (int(v) for v in sd["layer2.0.conv1.weight"].shape[:2])
        facts.update(groups_m=m, experts=n)
        return kind, facts
    if getattr(sd.get("layer2.0.conv1.weight"), "ndim", 0) == 4:
        return "bl", facts
    return None


def _fits(kind: str, facts: dict) -> str:
    """The options that build a model this checkpoint initialises."""
    variant = "" if kind == "bl" else f"--variant {kind} "
    return (f"{variant}--network r{facts['depth']} --width {facts['width']} --embedding-size "
            f"{facts['embedding_size']} --input-size {facts['input_size']}")


def _dgconv_from_bl(block: nn.Module, bl: dict, prefix: str) -> dict[str, torch.Tensor]:
    """A DGConv block's tensors from the BL block ``prefix`` (not exact: see :func:`init_condface`).

    Mid slot j of group g (q = 2*cout/m slots per group) stands for the BL mid channel c = (g*q + j) mod cout,
    which r = m*q/cout = 2 groups carry; its experts are all (m/r) * W1[c, input group g] (the BL kernel's
    input-channel group slice, scaled so that the r slices estimate the full sum), its bn2 and prelu those
    of c. conv2's output slot i of group g stands for the BL output channel o = (g*q + i) mod cout when g is
    even and o = (g*q + i + cout/2) mod cout when odd (so every (c, o) pair of the BL kernel has a path),
    with (cout/q) * W2[o, the group's mid channels]; the 1x1 projection averages the slots of each o."""
    m, n, q, cin_g = block.conv1.weight.shape[:4]
    cout = block.bn3.num_features
    w1, w2 = bl[prefix + "conv1.weight"], bl[prefix + "conv2.weight"]
    r = m * q // cout
    mid = [[(g * q + j) % cout for j in range(q)] for g in range(m)]
    outs = [[(g * q + i + (cout // 2 if g % 2 else 0)) % cout for i in range(q)] for g in range(m)]
    k1 = torch.zeros(m, q, cin_g, *w1.shape[2:])
    k2 = torch.zeros(m, q, q, *w2.shape[2:])
    project = torch.zeros(cout, 2 * cout, 1, 1)
    for g in range(m):
        k1[g] = w1[mid[g], g * cin_g:(g + 1) * cin_g] * (m / r)
        k2[g] = w2[outs[g]][:, mid[g]] * (cout / q)
        for i, o in enumerate(outs[g]):
            project[o, g * q + i] = 1.0
    project /= project.sum(1, keepdim=True).clamp(min=1)
    order = [c for g in range(m) for c in mid[g]]
    out = {prefix + "conv1.weight": k1[:, None].expand(m, n, *k1.shape[1:]).clone(),
           prefix + "conv2.weight": k2[:, None].expand(m, n, *k2.shape[1:]).clone(),
           prefix + "project.weight": project}
    for name in ("weight", "bias", "running_mean", "running_var"):
        out[prefix + "bn2." + name] = bl[prefix + "bn2." + name][order].clone()
    out[prefix + "prelu.weight"] = bl[prefix + "prelu.weight"][order].clone()
    return out


def init_condface(model: nn.Module, path: str | Path, notes: list[str] | None = None) -> str:
    """``--init``: initialise a CondFace ``model`` from checkpoint ``path``; returns what it was ("condface"
    or "bl").

    * A CondFace checkpoint of the same architecture (variant, depth, width, experts, groups, embedding
      and input size): every weight copied (the training state -- margin head, clustering, optimiser --
      starts fresh).
    * A BL (plain IR-ResNet) checkpoint of the same depth, width, embedding and input size: the stem,
      ``layer1``, every block's bn1 / bn3 / shortcut and the head copied; the routing networks keep their
      fresh initialisation. DC: every expert of a dynamic convolution is the BL kernel, so the model
      computes the BL function **exactly** whatever the routing (identical experts). DGConv: every expert
      of input group k is built from the BL kernel's input-channel slice k (all n experts equal: the
      routing does not change the output at step 0) -- but **not exactly**: a grouped 3x3 -> PReLU ->
      grouped 3x3 makes the branch a sum of functions of single channel groups, which a dense 3x3 through
      a PReLU is not (even without the PReLU, a composition of dense 3x3 kernels does not factor through
      2*cout/m channels per group); :func:`_dgconv_from_bl` gives the construction.

    Anything else (another architecture, depth or width) is a one-line error naming the options that fit."""
    from facetool.models.checkpoint import read_checkpoint

    sd = read_checkpoint(Path(path))["state_dict"]
    own = model.state_dict()
    found, mine = _geometry(sd), _geometry(own)
    assert mine is not None
    if found is None:
        raise FacetoolError(f"--init {path}: not an IR-ResNet or CondFace checkpoint; --init takes a CondFace model "
                            f"({_fits(*mine)}) or a plain IR-ResNet (BL) of the same depth and width")
    kind, facts = found
    same = {k: v for k, v in facts.items() if k in ("depth", "width", "embedding_size", "input_size")}
    if kind != "bl" and (kind != mine[0] or facts != mine[1]) or kind == "bl" and any(
            mine[1][k] != v for k, v in same.items()):
        what = "a BL (IR-ResNet)" if kind == "bl" else f"a CondFace {kind}"
        extra = "" if kind == "bl" else f" ({facts['groups_m']} groups x {facts['experts']} experts)"
        raise FacetoolError(f"--init {path}: {what} checkpoint{extra} that fits {_fits(kind, facts)}; this run builds "
                            f"{_fits(*mine)}")
    if kind != "bl":
        model.load_state_dict(sd, strict=True)
        return "condface"
    new: dict[str, torch.Tensor] = {}
    for name, block in model.named_modules():
        if not hasattr(block, "router") or not hasattr(block, "bn3"):
            continue
        p = name + "."
        if block.variant == "dc":
            for c in ("conv1", "conv2"):
                w = getattr(block, c).weight
                new[p + c + ".weight"] = sd[p + c + ".weight"][None, None].expand_as(w).clone()
        else:
            new.update(_dgconv_from_bl(block, sd, p))
    copied = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape and k not in new}
    copied.update(new)
    left = [k for k in own if k not in copied]
    if any(".router." not in k for k in left):  # a layout this mapping does not know
        bad = [k for k in left if ".router." not in k]
        raise FacetoolError(f"--init {path}: no BL tensor for {', '.join(bad[:3])}" + (" ..." if len(bad) > 3 else ""))
    model.load_state_dict(copied, strict=False)
    if notes is not None:
        notes.append(f"--init {path}: CondFace {model.variant} from a BL IR-ResNet: "
                     + ("every expert is the BL kernel (the BL function exactly)" if model.variant == "dc" else
                        "experts from the BL kernels' input-group slices (an approximation of the BL function: "
                        "grouped convolutions cannot mix the groups before the PReLU)")
                     + "; the routing networks start fresh")
    return "bl"


def train_condface(store: str | Path, cfg: Any, *, variant: str = "dgconv", network: str = "r18",
                   clustering: str = "none", prototypes: int = 300, head: str = "mlp", lam: float = 1.0,
                   temperature: tuple[float, float] | None = None, loss: str = "cosface", width: int = 64,
                   init: str | Path | None = None, **arcface: Any) -> dict[str, float]:
    """Train a CondFace model with :func:`~facetool.trainers.arcface.train_arcface`'s recipe and a
    :class:`CondFaceMethod`; ``arcface`` are train_arcface's other keyword arguments. ``init``: a CondFace
    or BL checkpoint the model starts from (:func:`init_condface`; the thesis's clustering runs start from
    the pretrained model)."""
    from facetool.trainers.arcface import train_arcface

    name = condface_network(variant, network)
    if clustering not in CLUSTERINGS:
        raise FacetoolError(f"unknown --clustering {clustering!r}; choose one of {', '.join(CLUSTERINGS)}")
    if clustering != "none" and head not in CLUSTER_HEADS:
        raise FacetoolError(f"unknown --cluster-head {head!r}; choose one of {', '.join(CLUSTER_HEADS)}")
    if isinstance(prototypes, bool) or not isinstance(prototypes, int) or prototypes < 2:
        raise FacetoolError(f"--prototypes must be an integer >= 2, got {prototypes!r}")
    model_kwargs = {"width": width} if width != 64 else {}
    if temperature is not None:
        model_kwargs["temperature"] = temperature[1]  # what the trained model runs at (start_epoch anneals to it)

    def make(model: nn.Module, **kw: Any) -> CondFaceMethod:
        return CondFaceMethod(routing_dim=routing_dim(model), clustering=clustering, prototypes=prototypes,
                              head=head, lam=lam, temperature=temperature, epochs=cfg.epochs, **kw)

    def start_from(model: nn.Module) -> None:
        from facetool.distributed import is_main

        notes: list[str] = []
        init_condface(model, init, notes)
        if cfg.verbose and is_main():
            from facetool.console import err_console

            for line in notes:
                err_console.print(f"note: {line}", highlight=False, soft_wrap=True, markup=False)

    cfg.extra = {**cfg.extra, "variant": variant, "clustering": clustering,
                 **({"init": str(init)} if init is not None else {})}
    return train_arcface(store, cfg, network=name, loss=loss, family="condface", model_kwargs=model_kwargs or None,
                         method_factory=make, prepare_model=start_from if init is not None else None, **arcface)


__all__ = ["sinkhorn", "spherical_kmeans", "KMeansClassifier", "CondFaceMethod", "train_condface", "parse_temperature",
           "temperature_at", "init_condface"]
