#!/usr/bin/env bash
# Every GPU figure of issue 11, each part bounded in time and independent of the others.
#
#   bash benchmarks/gpu_all.sh [OUTDIR]          # from the repository root; OUTDIR default $OUT or ./out/gpu
#
# Parts (logs and JSON in OUTDIR):
#   a) benchmarks/r1m.py --device cuda --dim 2048   rOxford + 1M synthetic distractors, fp16 chunked top-k
#   b) benchmarks/gpu_search.py                     exact search 1M x 2048 fp16 through cbir.index.Index
#   c) benchmarks/gpu_extract.py                    ResNet-101, 3 scales, 1024 px, JPEG files -> descriptors:
#                                                   nvJPEG decode + bf16 batches vs the cirtorch-style loop
#   d) benchmarks/train.py --device cuda            training images/s (bf16 autocast vs per-image fp32)
#   f) benchmarks/extract.py --device cuda          the same extraction figure through the `extract` benchmark
#                                                   (cbir.extract with GPU decode vs its cirtorch-style loop)
#   e) tests/test_topk.py                           the CUDA test of cbir.topk (fp16 ranking = in-memory fp16)
# Environment: PYTHON (default python3), CBIR_SHARED (reference data: needs data/oxford5k-fc7-128d and
# data/revisitop/gnd_roxford5k.pkl for a), GPU_JPG (folder of JPEGs for c; default
# $CBIR_SHARED/data/rparis6k-250/jpg), GPU_PARTS (default "a b c f d e"), R1M_N (default 1000000).
set +e
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="${1:-${OUT:-$ROOT/out/gpu}}"
mkdir -p "$OUTDIR"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export CBIR_SHARED="${CBIR_SHARED:-$(cd "$ROOT/.." && pwd)/shared}"
JPG="${GPU_JPG:-$CBIR_SHARED/data/rparis6k-250/jpg}"
PARTS="${GPU_PARTS:-a b c f d e}"
R1M_N="${R1M_N:-1000000}"
TMPF="${TMPDIR:-/tmp}/cbir_gpu_r1m"
LOG="$OUTDIR/gpu_all.log"

say() { echo "== $*" | tee -a "$LOG"; }
part() {  # part NAME SECONDS command...
  local name="$1" secs="$2"; shift 2
  say "$name: $* (limit ${secs}s) $(date -u +%H:%M:%S)"
  local t0=$SECONDS
  timeout --kill-after=10 "$secs" "$@" 2>&1 | tee "$OUTDIR/$name.log" | tee -a "$LOG" >/dev/null
  local rc=${PIPESTATUS[0]}
  tail -n 25 "$OUTDIR/$name.log"
  say "$name: exit $rc after $((SECONDS - t0)) s"
}

say "gpu_all $(date -u '+%Y-%m-%d %H:%M UTC') root=$ROOT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$LOG"

for p in $PARTS; do
  case "$p" in
    a) part r1m 130 "$PY" "$ROOT/benchmarks/r1m.py" --device cuda --dim 2048 --n "$R1M_N" --file "$TMPF" \
         --json "$OUTDIR/r1m_cuda_2048.json"
       rm -rf "$TMPF" "${TMPF}_features" "$(dirname "$TMPF")/cli_result.json" ;;
    b) part search 110 "$PY" "$ROOT/benchmarks/gpu_search.py" --n 1000000 --dim 2048 --nq 10000 --k 100 \
         --json "$OUTDIR/search_cuda.json" ;;
    c) part extract 100 "$PY" "$ROOT/benchmarks/gpu_extract.py" --folder "$JPG" --images 40 --model resnet101 \
         --weights none --imsize 1024 --scales 1,0.7071,0.5 --json "$OUTDIR/extract_cuda.json" ;;
    d) part train 60 "$PY" "$ROOT/benchmarks/train.py" --device cuda --model resnet101 --weights none --imsize 512 \
         --tuples 4 --negatives 5 --steps 3 --json "$OUTDIR/train_cuda.json" ;;
    f) if grep -q -- "--decode" "$ROOT/benchmarks/extract.py"; then
         part extract_lib 110 "$PY" "$ROOT/benchmarks/extract.py" --device cuda --model resnet101 --weights none \
           --folder "$JPG" --images 40 --imsize 1024 --rounds 3
       else say "extract_lib: benchmarks/extract.py has no GPU decode option at this version; skipped"; fi ;;
    e) part tests 45 "$PY" -m pytest -q -x -p no:cacheprovider "$ROOT/tests/test_topk.py" ;;
  esac
done
say "done $(date -u +%H:%M:%S)"
