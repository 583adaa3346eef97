#!/usr/bin/env bash
# The GPU check: prunes a BERT-base-shaped encoder for CUDA device 0 at two budgets and
# prints the block latency table, predicted against measured latency, and the measured
# speedups. Meant for a GPU machine with no network, in under 8 minutes.
#
#   scripts/gpu_check.sh ZIPLM_BINARY [OUT_DIR]
#
# ZIPLM_BINARY: a release build with the `cuda` feature
#   (`cargo build --release --features cuda`; the binary is target/release/ziplm).
# Settings (environment):
#   ZIPLM_GPU_MODEL   an ONNX encoder to use instead of exporting one (default: a
#                     BERT-base-shaped encoder with random weights, exported here by
#                     scripts/export_bert_onnx.py with torch + transformers: latency needs
#                     no trained weights)
#   ZIPLM_GPU_BATCH   sequences per call (default 32; GPUs serve batches), with
#   ZIPLM_GPU_SEQ     tokens per sequence (default 128)
#   ZIPLM_GPU_BUDGETS speedups (default "1.5 2.0")
#   ZIPLM_GPU_FFN_MULTIPLE FFN width step of the shape grid (default 256: 12 FFN widths
#                     and 12 head counts to time, each a whole BERT-base prepared on the
#                     GPU; 32 would be 96 FFN widths)
#   ZIPLM_GPU_TARGET  "--cuda 0" (default), or "--threads N" to dry-run the same steps on
#                     a CPU
set -euo pipefail

bin=${1:?usage: scripts/gpu_check.sh ZIPLM_BINARY [OUT_DIR]}
out=${2:-gpu-check}
batch=${ZIPLM_GPU_BATCH:-32}
seq=${ZIPLM_GPU_SEQ:-128}
budgets=${ZIPLM_GPU_BUDGETS:-1.5 2.0}
target=${ZIPLM_GPU_TARGET:---cuda 0}
multiple=${ZIPLM_GPU_FFN_MULTIPLE:-256}
here=$(cd "$(dirname "$0")" && pwd)
start=$(date +%s)
mkdir -p "$out"

stamp() { echo "[$(($(date +%s) - start)) s] $*"; }

# tract-cuda loads the driver, cudart, NVRTC, cuBLAS and cuDNN by name when it starts: put
# the CUDA toolkit's folder and those of Python's nvidia-* wheels (cuDNN often comes only
# that way) on the loader's path.
libdirs=$(python3 -c '
import glob, os, site
dirs = ["/usr/local/cuda/lib64"]
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "lib")))
    dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "*", "lib")))
print(":".join(d for d in dirs if os.path.isdir(d)))
' 2>/dev/null || true)
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# tract-cuda compiles its kernels with NVRTC against the toolkit's headers (cuda_fp16.h,
# CCCL) when it starts, and caches them under XDG_CACHE_HOME.
if [ -z "${CUDA_HOME:-}" ]; then
    if [ -d /usr/local/cuda ]; then
        export CUDA_HOME=/usr/local/cuda
    elif command -v nvcc >/dev/null; then
        CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
        export CUDA_HOME
    fi
fi
if [[ "$target" == --cuda* ]] &&
    ! find "${CUDA_HOME:-/nonexistent}/" -maxdepth 4 -name cuda_fp16.h 2>/dev/null | grep -q .; then
    echo "gpu_check: no CUDA toolkit headers (cuda_fp16.h) under CUDA_HOME=${CUDA_HOME:-unset}: set CUDA_HOME to the toolkit" >&2
    exit 2
fi
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-$PWD/$out/cache}

stamp "machine (CUDA_HOME=${CUDA_HOME:-unset})"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null ||
    echo "(nvidia-smi not available)"
"$bin" --version

model=${ZIPLM_GPU_MODEL:-}
if [ -z "$model" ]; then
    model="$out/bert-base.onnx"
    if [ ! -f "$model" ]; then
        stamp "exporting a BERT-base-shaped encoder (12 layers, hidden 768, 12 heads, FFN 3072)"
        python3 "$here/export_bert_onnx.py" "$model"
    fi
fi
stamp "model: $model"
"$bin" inspect "$model" --seq-len "$seq" | head -n 8

speedups=()
for s in $budgets; do speedups+=(--speedup "$s"); done

stamp "profiling block shapes at ${batch}x${seq} ($target; the first model prepared on a GPU also compiles tract-cuda's kernels)"
# shellcheck disable=SC2086
"$bin" profile "$model" $target --batch "$batch" --seq-len "$seq" --ffn-multiple "$multiple" --quiet \
    -o "$out/latency-table.json" --json >/dev/null

stamp "pruning at ${budgets} (random calibration ids; DP search, no refinement)"
# Exit 1 = a budget missed after verification: the results below say by how much.
rc=0
# shellcheck disable=SC2086
"$bin" prune "$model" $target --batch "$batch" --seq-len "$seq" "${speedups[@]}" \
    --ffn-multiple "$multiple" \
    --samples 32 --refine 0 --quiet --json \
    --latency-table "$out/latency-table.json" --out "$out/pruned" >"$out/report.json" || rc=$?
[ "$rc" -le 1 ] || exit "$rc"

stamp "results"
python3 - "$out/latency-table.json" "$out/report.json" <<'EOF'
import json, sys
table = json.load(open(sys.argv[1]))
report = json.load(open(sys.argv[2]))
key = table["key"]
print(f"target: {key['target']['runtime']} {key['target']['runtime_version']} on {key['target']['device']}")
w = key["workload"]
print(f"workload: {w}")
print(f"rest (embeddings, norms, head): {table['rest']['median_ms']:.3f} ms")
print("block table (median ms of one block; min-max):")
for e in table["entries"]:
    s, t = e["shape"], e["timing"]
    what = (f"attention {s['heads']:>2} heads" if s["kind"] == "attention"
            else f"ffn {s['width']:>5} neurons")
    print(f"  {what:<22} {t['median_ms']:8.3f}  ({t['min_ms']:.3f}-{t['max_ms']:.3f})")
print("budgets:")
for b in report["budgets"]:
    pd, p = b["predicted_dense_ms"], b["predicted_ms"]
    md, m = b.get("measured_dense_ms"), b.get("measured_ms")
    line = f"  {b['output']}: predicted {p:.3f} ms (dense {pd:.3f}, {pd / p:.2f}x)"
    if m is not None:
        line += f"; measured {m:.3f} ms (dense {md:.3f}, {b['measured_speedup']:.2f}x); met: {b['met']}"
    print(line)
    heads = [l["heads"][0] for l in b["layers"]]
    ffn = [l["ffn"][0] for l in b["layers"]]
    print(f"    heads per layer {heads}")
    print(f"    FFN per layer   {ffn}")
for n in report["notes"]:
    print(f"note: {n}")
print(f"stages (s): {report['stages']}")
EOF
stamp "done; files in $out (prune exit code $rc)"
exit "$rc"
