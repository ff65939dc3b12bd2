"""facetool.PartialFC: the class-sharded margin head. Known answers: at rate 1 on one process it is the
full MarginHead (loss and gradients); a sampled step keeps every positive; insightface's shard split;
two gloo processes train the same head (merged) and backbone as one process on their joint batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import facetool
from facetool.errors import FacetoolError
from facetool.models.heads import MarginHead
from facetool.models.partial_fc import PartialFC, memory_estimate, shard_range

D, C = 16, 10


@pytest.mark.parametrize("margin, margins", [("arcface", (1.0, 0.5, 0.0)), ("cosface", (1.0, 0.0, 0.4))])
def test_rate_one_on_one_process_is_the_full_margin_head(margin, margins):
    torch.manual_seed(0)
    full = MarginHead(D, C, margins, s=64.0)
    pfc = PartialFC(D, C, 1.0, margin)
    with torch.no_grad():
        pfc.weight.copy_(full.weight)
    emb = torch.randn(12, D)
    labels = torch.randint(0, C, (12,))
    e1, e2 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    ref = F.cross_entropy(full(e1, labels), labels)
    loss = pfc(e2, labels)
    ref.backward()
    loss.backward()
    assert abs(float(loss.detach()) - float(ref.detach())) < 1e-5 and float(ref.detach()) > 1.0
    assert torch.allclose(e2.grad, e1.grad, atol=1e-5, rtol=0) and e1.grad.abs().max() > 1e-3
    assert torch.allclose(pfc.weight.grad, full.weight.grad, atol=1e-5, rtol=0)
    top1 = float((full.cosine(emb).argmax(1) == labels).float().mean())
    assert pfc.last_top1 == pytest.approx(top1)


def test_shard_split_as_insightface_and_memory_formula():
    # C = 10 over W = 4: 3, 3, 2, 2 rows starting at 0, 3, 6, 8
    assert [shard_range(10, r, 4) for r in range(4)] == [(0, 3), (3, 3), (6, 2), (8, 2)]
    # WebFace42M, W = 8, D = 512: 257,489 rows -> 527 MB of weight; B = 128, r = 0.2 -> 211 MB of logits
    m = memory_estimate(2_059_906, 512, 8, 128, 0.2)
    assert m["weight"] == 257_489 * 512 * 4 and round(m["weight"] / 1e6) == 527
    # below rate 1 the gradient holds only the 51,497 sampled rows: 2 x 527 MB + 105 MB = 1,160 MB
    assert m["state"] == (2 * 257_489 + 51_497) * 512 * 4 == 1_160_140_800 and round(m["logits"] / 1e6) == 211
    assert memory_estimate(2_059_906, 512, 8, 128, 1.0)["state"] == 3 * m["weight"]  # dense gradient at rate 1


def test_initial_weight_does_not_depend_on_the_number_of_processes():
    c = 2500  # three init blocks, split inside blocks
    one = PartialFC(D, c, 1.0, rank=0, world=1, seed=7).weight
    parts = [PartialFC(D, c, 1.0, rank=r, world=3, seed=7).weight for r in range(3)]
    assert [p.shape[0] for p in parts] == [834, 833, 833]
    assert torch.equal(torch.cat(parts), one) and abs(float(one.std()) - 0.01) < 1e-3


def test_a_sampled_step_keeps_every_positive():
    pfc = PartialFC(D, 1000, 0.1, rank=0, world=1, seed=0)  # 100 centres a step
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        local = torch.randint(0, 1000, (int(torch.randint(1, 60, (1,), generator=g)),), generator=g)
        local[::3] = -1  # some targets on other ranks
        index, labels = pfc.sample(local)
        pos = set(local[local >= 0].tolist())
        assert len(index) == 100 and pos <= set(index.tolist())
        assert torch.equal(index, index.sort()[0]) and len(set(index.tolist())) == 100
        own = local >= 0
        assert torch.equal(index[labels[own]], local[own]) and bool((labels[~own] == -1).all())
    many = torch.arange(0, 1000, 7)  # 143 positives > 100: only the positives
    index, labels = pfc.sample(many)
    assert torch.equal(index, many) and torch.equal(labels, torch.arange(len(many)))


def test_sampled_training_loss_is_finite_and_the_eval_loss_uses_every_class():
    torch.manual_seed(0)
    pfc = PartialFC(D, 1000, 0.1, "cosface")
    emb, labels = torch.randn(8, D, requires_grad=True), torch.randint(0, 1000, (8,))
    loss = pfc(emb, labels)
    loss.backward()
    rows = pfc.weight.grad.to_dense().abs().sum(1) > 0
    assert torch.isfinite(loss) and int(rows.sum()) == 100 and bool(rows[labels].all())
    pfc.eval()
    full = MarginHead(D, 1000, (1.0, 0.0, 0.4))
    with torch.no_grad():
        full.weight.copy_(pfc.weight)
        assert float(pfc(emb, labels)) == pytest.approx(float(F.cross_entropy(full(emb, labels), labels)), abs=1e-5)


def _sgd_steps(sparse: bool, monkeypatch, steps: int = 5) -> tuple[Tensor, list[bool]]:
    """``steps`` sampled PartialFC steps (rate 0.1 of 1000 centres, momentum 0.9, weight decay 5e-4): the
    sparse gradient with the engine's ShardSGD, or (``sparse=False``) insightface's dense update -- the
    gradient of ``weight[index]`` and torch's SGD. The same samples (the generator reseeded per step)."""
    from facetool.engine import ShardSGD
    from facetool.models import partial_fc

    if not sparse:
        monkeypatch.setattr(partial_fc.RowGather, "apply", lambda w, i: w[i])
    pfc = PartialFC(D, 1000, 0.1, rank=0, world=1, seed=0)
    kind = ShardSGD if sparse else torch.optim.SGD
    opt = kind(pfc.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    layouts = []
    for t in range(steps):
        torch.manual_seed(t)
        emb, labels = torch.randn(8, D), torch.randint(0, 1000, (8,))
        opt.zero_grad()
        pfc(emb, labels).backward()
        layouts.append(pfc.weight.grad.is_sparse and pfc.weight.grad._nnz() == 100)
        opt.step()
    monkeypatch.undo()
    return pfc.weight.detach().clone(), layouts


def test_sampled_gradient_is_sparse_and_shard_sgd_equals_the_dense_update(monkeypatch):
    """The sampled step's gradient holds only its 100 rows; after 5 steps the weights equal insightface's dense
    update bit for bit, including rows never sampled (weight decay and momentum move them too)."""
    sparse, layouts = _sgd_steps(True, monkeypatch)
    dense, dense_layouts = _sgd_steps(False, monkeypatch)
    assert all(layouts) and not any(dense_layouts)
    init = PartialFC(D, 1000, 0.1, rank=0, world=1, seed=0).weight.detach()
    assert (sparse - init).abs().max() > 1e-3 and bool(((sparse - init).abs().sum(1) > 0).all())
    assert torch.equal(sparse, dense)


@pytest.mark.parametrize("kw", [{}, {"dampening": 0.1}, {"nesterov": True}, {"momentum": 0.0}, {"maximize": True}])
def test_shard_sgd_on_row_sparse_gradients_equals_torch_sgd_across_blocks(monkeypatch, kw):
    """ShardSGD works in blocks of rows (BLOCK 7 here: 23 rows = 4 blocks): with a row-sparse gradient it gives
    torch's SGD on the dense one, every option, three steps (the second and third use the momentum buffer)."""
    from facetool.engine import ShardSGD

    monkeypatch.setattr(ShardSGD, "BLOCK", 7)
    opts = {"lr": 0.3, "momentum": 0.9, "weight_decay": 1e-2, **kw}
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(23, 5, generator=g)
    a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    sa, sb = ShardSGD([a], **opts), torch.optim.SGD([b], **opts)
    for rows in ([0, 6, 7, 20], [3, 14, 22], [1, 2, 13, 21]):
        idx = torch.tensor(rows)
        vals = torch.randn(len(rows), 5, generator=g)
        a.grad = torch.sparse_coo_tensor(idx[None], vals, a.shape)
        b.grad = torch.zeros_like(w0).index_copy_(0, idx, vals)
        sa.step()
        sb.step()
    assert torch.equal(a.detach(), b.detach()) and not torch.equal(a.detach(), w0)
    assert sa.state_dict()["state"].keys() == sb.state_dict()["state"].keys()


def test_gradient_clipping_counts_a_sparse_gradient_as_its_dense_one():
    from facetool.engine import _clip_grad_norm

    w = nn.Parameter(torch.zeros(6, 2))
    v = nn.Parameter(torch.zeros(3))
    w.grad = torch.sparse_coo_tensor(torch.tensor([[1, 4]]), torch.tensor([[3.0, 0.0], [0.0, 4.0]]), (6, 2))
    v.grad = torch.tensor([0.0, 0.0, 12.0])  # total norm sqrt(9 + 16 + 144) = 13
    _clip_grad_norm([v], [w], 1.3, world=1)
    assert torch.allclose(w.grad.to_dense()[[1, 4]], torch.tensor([[0.3, 0.0], [0.0, 0.4]]), atol=1e-6)
    assert torch.allclose(v.grad, torch.tensor([0.0, 0.0, 1.2]), atol=1e-6)


def test_public_name_and_bad_arguments():
    assert facetool.PartialFC is PartialFC
    with pytest.raises(FacetoolError, match=r"\(0, 1\]"):
        PartialFC(D, C, 0.0)
    with pytest.raises(FacetoolError, match="arcface or cosface"):
        PartialFC(D, C, 0.5, "softmax")
    with pytest.raises(FacetoolError, match="cannot be split"):
        PartialFC(D, 1, 0.5, rank=0, world=2)


# -- two gloo processes ------------------------------------------------------------------------------
STEPS, B, IN = 3, 6, 8


def _steps(rank: int, world: int) -> tuple[dict, dict]:
    """STEPS SGD steps (momentum, weight decay) of a linear backbone + PartialFC at rate 1; rank r of
    ``world`` trains on its B rows of the joint batch. Returns (backbone state, this rank's head state)."""
    torch.manual_seed(0)
    backbone = nn.Linear(IN, D)
    head = PartialFC(D, 7, 1.0, "arcface", seed=3)  # 7 classes: 4 + 3 rows on two ranks
    train_bb: nn.Module = nn.parallel.DistributedDataParallel(backbone) if world > 1 else backbone
    opt = torch.optim.SGD(backbone.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    opt_head = torch.optim.SGD(head.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = torch.randn(2 * B, IN, generator=g), torch.randint(0, 7, (2 * B,), generator=g)
        if world > 1:
            x, y = x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B]
        loss = head(train_bb(x), y)
        opt.zero_grad()
        opt_head.zero_grad()
        loss.backward()
        opt.step()
        opt_head.step()
    return {k: v.detach().clone() for k, v in backbone.state_dict().items()}, head.state_dict()


def _worker(rank: int, world: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)
    try:
        bb, head = _steps(rank, world)
        torch.save({"backbone": bb, "head": head}, f"{root}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_train_the_same_head_and_backbone_as_one(tmp_path):
    """After 3 SGD steps the merged head and the backbone of two processes (B = 6 each, DDP backbone)
    equal one process's on the joint batch of 12 (the AllGather backward's x W undoes DDP's average)."""
    torch.multiprocessing.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [p["head"]["weight"].shape[0] for p in parts] == [4, 3]
    bb, head = _steps(0, 1)
    merged = PartialFC.merge([p["head"] for p in parts])
    init = PartialFC(D, 7, 1.0, seed=3, rank=0, world=1).weight
    assert (merged["weight"] - init).abs().max() > 1e-3  # the head learnt
    assert torch.allclose(merged["weight"], head["weight"], atol=1e-5, rtol=0)
    for k in bb:
        assert torch.allclose(parts[0]["backbone"][k], bb[k], atol=1e-5, rtol=0), k


def test_the_cosines_are_freed_before_the_cross_entropy(monkeypatch):
    """Logit-sized tensors alive at once in a step: the cosines go once the margin logits exist (the margin
    saves no copy of them), so the distributed cross-entropy's probabilities are the second copy, not the third."""
    import weakref

    from facetool.models import partial_fc as pfc_module

    refs: list = []
    alive: list[bool] = []
    linear, apply = F.linear, pfc_module.DistCrossEntropy.apply

    def tracked_linear(*a):
        out = linear(*a)
        refs.append(weakref.ref(out))
        return out

    def checked_apply(*a):
        alive.append(refs[-1]() is not None)
        return apply(*a)

    monkeypatch.setattr(pfc_module.F, "linear", tracked_linear)
    monkeypatch.setattr(pfc_module.DistCrossEntropy, "apply", checked_apply)
    head = PartialFC(D, 200, 0.5, seed=0)
    emb = torch.randn(12, D, requires_grad=True)
    head(emb, torch.randint(0, 200, (12,))).backward()
    assert alive == [False] and emb.grad is not None
