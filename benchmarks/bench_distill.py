"""Distillation overhead: one SRRL / KD / ... training step of the student vs the student's plain
cross-entropy step, the teacher's forward under ``torch.inference_mode`` vs with autograd recording,
and the peak memory of both steps.

Every timing comes from this run, on the same student, teacher and batch; the variants are
interleaved round by round so that load from other processes hits them alike (medians of wall and
process-CPU time are reported; CPU time is the steadier measure on a shared machine). Peak memory is
``torch.cuda.max_memory_allocated`` on a GPU; on the CPU it is the peak resident set of a fresh child
process that runs the step a few times (torch's own footprint is in both numbers, so the difference is
what the teacher and the method add).

    .venv/bin/python benchmarks/bench_distill.py --quick                    # ResNet-18 w16 -> w8, 64 px
    .venv/bin/python benchmarks/bench_distill.py --teacher resnet101 --student resnet18 --width 64 --size 112 --batch 64
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch


def build(args, kind: str):
    from facetool.trainers.distill import DistillMethod, Teacher
    from facetool.models import create_model

    torch.manual_seed(0)
    teacher = create_model(args.teacher, num_classes=args.classes, input_size=args.size, width=args.teacher_width)
    student = create_model(args.student, num_classes=args.classes, input_size=args.size, width=args.width)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, args.classes, (args.batch,))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method = DistillMethod(kind, Teacher(teacher), student, probe=x[:4])
    student.to(device).train()
    heads = torch.nn.ModuleDict(method.modules()).to(device).train()
    params = list(student.parameters()) + list(heads.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    return teacher, student, method, opt, x.to(device), y.to(device)


def step_fn(student, method, opt, x, y):
    batch = {"image": x, "label": y}

    def step():
        out = student(x)
        terms = method.loss(student, batch, out, {})
        opt.zero_grad(set_to_none=True)
        sum(terms.values()).backward()
        opt.step()
    return step


def _timed(fn, cuda: bool) -> tuple[float, float]:
    if cuda:
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def _peak_child(args, kind: str, q) -> None:
    import resource

    torch.set_num_threads(args.threads)
    _, student, method, opt, x, y = build(args, kind)
    with method.attached(student):
        step = step_fn(student, method, opt, x, y)
        for _ in range(3):
            step()
    q.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB -> MiB


def peak_memory_mib(args, kind: str) -> float:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        _, student, method, opt, x, y = build(args, kind)
        with method.attached(student):
            step = step_fn(student, method, opt, x, y)
            for _ in range(3):
                step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_peak_child, args=(args, kind, q))
    p.start()
    value = q.get()
    p.join()
    return float(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="resnet18")
    ap.add_argument("--teacher-width", type=int, default=16)
    ap.add_argument("--student", default="resnet18")
    ap.add_argument("--width", type=int, default=8, help="student width")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--classes", type=int, default=16)
    ap.add_argument("--methods", default="srrl,kd,at", help="comma-separated distillation methods to time")
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="3 timed rounds, SRRL only, no memory children")
    args = ap.parse_args()
    if args.quick:
        args.iters, args.methods = 3, "srrl"
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    kinds = [k.strip() for k in args.methods.split(",") if k.strip()]

    variants = {}
    builds = {k: build(args, k) for k in ["none", *kinds]}
    ctxs = []
    for k, (teacher, student, method, opt, x, y) in builds.items():
        ctx = method.attached(student)
        ctx.__enter__()
        ctxs.append(ctx)
        variants[f"step {k}"] = step_fn(student, method, opt, x, y)
    teacher, _, method, _, x, _ = builds[kinds[0]]
    teacher.to(x.device)

    def teacher_inference():
        method.teacher.run(x, method.teacher_layers)

    def teacher_autograd():  # what a careless implementation pays: autograd graph of the frozen teacher
        for p in teacher.parameters():
            p.requires_grad_(True)
        teacher(x).sum()
        for p in teacher.parameters():
            p.requires_grad_(False)

    variants["teacher fwd inference_mode"] = teacher_inference
    variants["teacher fwd with autograd"] = teacher_autograd
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for _ in range(args.iters):
        for k, fn in variants.items():
            times[k].append(_timed(fn, cuda))
    for ctx in ctxs:
        ctx.__exit__(None, None, None)

    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}
    base_w, base_c = med["step none"]
    print(f"device {'cuda' if cuda else 'cpu'}  teacher {args.teacher} w{args.teacher_width}  student {args.student} "
          f"w{args.width}  {args.size}px  batch {args.batch}  threads {args.threads}  rounds {args.iters}")
    print(f"{'variant':32s} {'wall ms':>9s} {'cpu ms':>9s} {'wall ratio':>11s} {'cpu ratio':>10s}")
    for k, (w, c) in med.items():
        ref_w, ref_c = (base_w, base_c) if k.startswith("step") else med["teacher fwd with autograd"]
        print(f"{k:32s} {1e3 * w:9.1f} {1e3 * c:9.1f} {w / ref_w:11.2f} {c / ref_c:10.2f}")
    print("(step ratios vs the plain student step 'step none'; teacher ratios vs the teacher forward with autograd)")
    if not args.quick:
        mem = {k: peak_memory_mib(args, k) for k in ["none", *kinds]}
        what = "max_memory_allocated" if cuda else "peak RSS of a child process"
        for k, v in mem.items():
            print(f"peak memory {k:8s} {v:9.1f} MiB  ratio {v / mem['none']:.2f}  ({what})")


if __name__ == "__main__":
    main()
