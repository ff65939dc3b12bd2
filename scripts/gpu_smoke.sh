#!/usr/bin/env bash
# One-minute GPU check of facetool for a person with one (or more) CUDA GPUs:
#   AMP training step, NCCL with one process (and two if there are two GPUs), PartialFC (rate 1 equals the
#   full ArcFace head on the GPU; a sampled step), ONNX Runtime's CUDA provider, IJB feature extraction on a
#   tiny fixture (eval ijbc --device cuda).
# Prints PASS / FAIL / SKIP per check; exits 1 if any check failed. Without CUDA every GPU check is SKIP and
# the script exits 0. Run from the repository root (PYTHON defaults to .venv/bin/python, else python3):
#   bash scripts/gpu_smoke.sh
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
FAILED=0

# check NAME COMMAND...: exit 0 = PASS, 77 = SKIP (reason on the last line of its output), else FAIL
check() {
  local name="$1"; shift
  local log="$WORK/$name.log" rc
  if [ "$GPUS" -eq 0 ]; then echo "SKIP  $name (no CUDA device)"; return; fi  # no interpreter started for nothing
  timeout 300 "$@" >"$log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    echo "PASS  $name"
  elif [ $rc -eq 77 ]; then
    echo "SKIP  $name ($(tail -n 1 "$log"))"
  else
    echo "FAIL  $name (exit $rc)"; tail -n 5 "$log" | sed 's/^/      /'
    FAILED=1
  fi
}

GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)
echo "facetool GPU smoke test: $GPUS CUDA device(s), python $PY"

check amp-train-step "$PY" - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    print("no CUDA device"); sys.exit(77)
from facetool.models import create_model
from facetool.models.heads import MarginHead
torch.manual_seed(0)
model, head = create_model("iresnet18", embedding_size=64, input_size=112).cuda(), MarginHead(64, 10).cuda()
opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9)
scaler = torch.amp.GradScaler("cuda")
x, y = torch.randn(8, 3, 112, 112, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
for _ in range(2):
    with torch.autocast("cuda", dtype=torch.float16):
        emb = model(x)
        loss = torch.nn.functional.cross_entropy(head(emb, y), y)
    assert emb.dtype == torch.float16 and torch.isfinite(loss), (emb.dtype, loss)
    opt.zero_grad(); scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
print("loss", float(loss))
EOF

cat >"$WORK/nccl.py" <<'EOF'
import os, torch, torch.distributed as dist
local = int(os.environ["LOCAL_RANK"])
torch.cuda.set_device(local)
dist.init_process_group("nccl")
t = torch.full((4,), float(dist.get_rank() + 1), device="cuda")
dist.all_reduce(t)
w = dist.get_world_size()
assert torch.allclose(t, torch.full_like(t, w * (w + 1) / 2)), t
dist.destroy_process_group()
EOF
# nccl N: all_reduce over N processes, one GPU each
NCCL='
  if [ "$1" -lt "$2" ]; then echo "needs $2 GPU(s), found $1"; exit 77; fi
  "$0" -c "import sys, torch.distributed as d; sys.exit(0 if d.is_nccl_available() else 77)" || { echo "torch without NCCL"; exit 77; }
  "$0" -m torch.distributed.run --standalone --nproc_per_node="$2" "$3"
'
check nccl-1-process bash -c "$NCCL" "$PY" "$GPUS" 1 "$WORK/nccl.py"
check nccl-2-processes bash -c "$NCCL" "$PY" "$GPUS" 2 "$WORK/nccl.py"

check partial-fc "$PY" - <<'EOF'
import sys, torch, torch.nn.functional as F
if not torch.cuda.is_available():
    print("no CUDA device"); sys.exit(77)
from facetool.models.heads import MarginHead
from facetool.models.partial_fc import PartialFC
torch.manual_seed(0)
full, pfc = MarginHead(64, 1000).cuda(), PartialFC(64, 1000, 1.0, "arcface").cuda()
with torch.no_grad():
    pfc.weight.copy_(full.weight)
emb, y = torch.randn(32, 64, device="cuda"), torch.randint(0, 1000, (32,), device="cuda")
a, b = emb.clone().requires_grad_(), emb.clone().requires_grad_()
ref, got = F.cross_entropy(full(a, y), y), pfc(b, y)
ref.backward(); got.backward()
assert abs(float(ref) - float(got)) < 1e-4 and torch.allclose(a.grad, b.grad, atol=1e-5), (float(ref), float(got))
sampled = PartialFC(64, 1000, 0.1, "cosface").cuda()
with torch.autocast("cuda", dtype=torch.float16):
    loss = sampled(emb.half(), y)
loss.backward()
used = sampled.weight.grad.abs().sum(1) > 0
assert torch.isfinite(loss) and int(used.sum()) == 100 and bool(used[y].all())
print("loss", float(got), "sampled", float(loss))
EOF

check onnxruntime-cuda "$PY" - <<EOF
import sys, torch
if not torch.cuda.is_available():
    print("no CUDA device"); sys.exit(77)
try:
    import onnxruntime as ort
except ImportError:
    print("onnxruntime not installed"); sys.exit(77)
if "CUDAExecutionProvider" not in ort.get_available_providers():
    print("onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)"); sys.exit(77)
import numpy as np
from facetool.export import export_onnx
from facetool.models import create_model, save_checkpoint
torch.manual_seed(0)
m = create_model("iresnet18", embedding_size=64, input_size=112).eval()
save_checkpoint("$WORK/r18.pt", m, {})
export_onnx("$WORK/r18.pt", "$WORK/r18.onnx")
s = ort.InferenceSession("$WORK/r18.onnx", providers=["CUDAExecutionProvider"])
assert s.get_providers()[0] == "CUDAExecutionProvider", s.get_providers()
x = np.random.default_rng(0).standard_normal((2, 3, 112, 112)).astype(np.float32)
out = s.run(None, {s.get_inputs()[0].name: x})[0]
ref = m(torch.from_numpy(x)).detach().numpy()
assert np.abs(out - ref).max() < 1e-2, np.abs(out - ref).max()
EOF

check ijb-extraction bash -c '
  "$0" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 77)" || { echo "no CUDA device"; exit 77; }
  "$0" - <<EOF || exit 1
import sys, torch
sys.path.insert(0, "tests")
from fixtures_ijb import make_ijb
from facetool.models import create_model, save_checkpoint
make_ijb(__import__("pathlib").Path("$1/IJB"), identities=2, templates_per_id=2, seed=0)
torch.manual_seed(0)
save_checkpoint("$1/r18.pt", create_model("iresnet18", embedding_size=64, input_size=112).eval(), {})
EOF
  "$0" -m facetool eval ijbc --root "$1/IJB" --model "$1/r18.pt" --out "$1/eval" --device cuda --workers 0 \
    --batch-size 8 | tee /dev/stderr | grep -q "TAR"
' "$PY" "$WORK"

if [ $FAILED -ne 0 ]; then echo "gpu smoke: FAILED"; exit 1; fi
echo "gpu smoke: ok"
