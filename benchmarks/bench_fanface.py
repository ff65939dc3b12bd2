"""FAN-Face's cost: a training step and an inference forward of FAN-Face (BL h2l-2 and H2) vs the plain
recogniser (the same IR-ResNet, no FAN) and vs running the FAN separately then the recogniser (what a
two-model pipeline would cost), ratios from one run.

All variants use the same batch, interleaved round by round so that load from other processes hits each
alike (medians reported). The FAN is frozen (no_grad), so a FAN-Face step costs the recogniser's step plus
the FAN's forward and the integration layers' forward+backward. Defaults are CPU-sized (IR-18 width 16 at
112 px, a 2-stack FAN of width 64 at 256 px); --width 64 --fan-width 256 is the thesis's size (GPU).

    .venv/bin/python benchmarks/bench_fanface.py --batch 8 --iters 3
    .venv/bin/python benchmarks/bench_fanface.py --network r34 --width 64 --fan-width 256 --batch 64 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--network", default="r18")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--fan-width", type=int, default=64)
    ap.add_argument("--fan-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    from facetool.models import create_model
    from facetool.flops import flops_summary

    torch.manual_seed(0)
    fan_cfg = {"name": "fan2", "width": args.fan_width, "input_size": args.fan_size}
    common = {"fan": fan_cfg, "network": args.network, "width": args.width, "embedding_size": 512, "input_size": 112}
    models = {
        "recogniser": create_model(common["network"].replace("r", "iresnet", 1), width=args.width, input_size=112),
        "fanface_h2": create_model("fanface", **common, input_heatmaps="h2", integration="none"),
        "fanface_bl_h2l2": create_model("fanface", **common, input_heatmaps="none", integration="bl"),
    }
    fan = models["fanface_bl_h2l2"].fan
    for m in models.values():
        m.to(args.device)
    x = torch.rand(args.batch, 3, 112, 112, device=args.device) * 2 - 1

    def infer(name):
        m = models[name].eval()
        with torch.no_grad():
            m(x)

    def fan_then_recogniser():
        ff = models["fanface_bl_h2l2"]
        with torch.no_grad():
            fan(ff.fan_input(x))
            models["recogniser"].eval()(x)

    def step(name):
        m = models[name].train()
        m.zero_grad(set_to_none=True)
        m(x).float().pow(2).mean().backward()

    cases = {"infer recogniser": lambda: infer("recogniser"), "infer FAN then recogniser": fan_then_recogniser,
             "infer FAN-Face H2": lambda: infer("fanface_h2"), "infer FAN-Face BL h2l-2": lambda: infer("fanface_bl_h2l2"),
             "step recogniser": lambda: step("recogniser"), "step FAN-Face H2": lambda: step("fanface_h2"),
             "step FAN-Face BL h2l-2": lambda: step("fanface_bl_h2l2")}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():  # warm-up
        fn()
    for _ in range(args.iters):
        for k, fn in cases.items():
            _sync(args.device)
            t = time.perf_counter()
            fn()
            _sync(args.device)
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device {args.device}, batch {args.batch}, {args.network} width {args.width}, FAN width {args.fan_width} "
          f"at {args.fan_size} px, median of {args.iters}")
    for k, v in med.items():
        base = med["infer recogniser"] if k.startswith("infer") else med["step recogniser"]
        extra = f", {v / med['infer FAN then recogniser']:.2f}x FAN then recogniser" if k.startswith("infer FAN-Face") else ""
        print(f"  {k:28s} {v * 1e3:9.1f} ms  {v / base:5.2f}x recogniser{extra}")
    s = flops_summary(models["fanface_bl_h2l2"].cpu())
    r = flops_summary(models["recogniser"].cpu())
    print(f"GFLOPs/image: recogniser {r['gflops']:.3f}; FAN-Face BL {s['gflops']:.3f} of which FAN {s['fan_gflops']:.3f} "
          f"(without the FAN {s['gflops'] - s['fan_gflops']:.3f}); params M: {r['params_m']:.2f} / "
          f"{s['params_m'] - s['fan_params_m']:.2f} + FAN {s['fan_params_m']:.2f}")


if __name__ == "__main__":
    main()
