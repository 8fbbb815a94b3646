#!/usr/bin/env bash
# Inferno's backends on an NVIDIA machine: build llama-cpp-python with CUDA, bench a GGUF model
# with every layer on the GPU and with none, and record which execution provider the ONNX
# backend gets. Everything is logged to $OUT/gpu.log; figures go to $OUT/summary.json.
#
#   bash contrib/gpu/prepare.sh                 # first, on a machine with PyPI: fills .whl/
#   OUT=results bash contrib/gpu/check_backends.sh          # on the NVIDIA machine
#   GPU=0 OUT=/tmp/rehearsal bash contrib/gpu/check_backends.sh
#       # a rehearsal anywhere: no CUDA build; the llama-cpp-python already installed for
#       # PYTHON (default .venv/bin/python) stands in, and a small model replaces the 1B one
#
# The NVIDIA machine needs no network: wheels, the slimmed llama-cpp-python source and the
# MiniLM ONNX model come from .whl/ (see prepare.sh). The model benched is generated there
# (contrib/gpu/make_model.py: random weights, llama architecture, ~0.85B parameters) and
# quantised to Q4_K_M by `inferno convert`. The whole script keeps to TOTAL_S seconds
# (default 560): the build gets what the later steps leave it; when it runs out, a wheel
# built elsewhere in .whl/prebuilt/ is used if there is one, and the summary says so.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."
ROOT=$PWD
GPU=${GPU:-1}
OUT=${OUT:-/tmp/inferno-gpu-out}
TOTAL_S=${TOTAL_S:-560}
WORK=${WORK:-/tmp/inferno-gpu}
SITE=$WORK/site
START=$(date +%s)
mkdir -p "$OUT" "$WORK"
rm -f "$WORK"/*.json "$WORK"/steps.jsonl

PREBUILT_ONLY=${PREBUILT_ONLY:-0}          # 1: skip the build, use .whl/prebuilt
PREBUILT=.whl/prebuilt/llama_cpp_cuda_prebuilt.tar.xz
if [[ $GPU == 1 ]]; then
    PY=${PYTHON:-python3}
    SMALL=${SMALL:-0}
else
    PY=${PYTHON:-$ROOT/.venv/bin/python}
    SMALL=${SMALL:-1}
fi
MODEL_ARGS=()                                # the ~0.85B default of make_model.py
if [[ $SMALL == 1 ]]; then
    MODEL_ARGS=(--n-embd 256 --n-layer 4 --n-ff 512 --n-head 4 --n-head-kv 2 --vocab 2048)
fi
export INFERNO_KERNEL__DATA_DIR=$WORK/data
CONFIG=$WORK/inferno-gpu.toml

say() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }
left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }

# step NAME SECONDS COMMAND...: run with a time limit, log it, record rc and duration.
step() {
    local name=$1 limit=$2 rc began
    shift 2
    (( limit > $(left) )) && limit=$(left)
    if (( limit < 5 )); then
        say "SKIP $name: out of time"
        echo "{\"step\": \"$name\", \"rc\": null, \"seconds\": 0, \"skipped\": true}" \
            >>"$WORK/steps.jsonl"
        return 99
    fi
    say "BEGIN $name (limit ${limit}s): $*"
    began=$(date +%s)
    timeout --kill-after=5 "$limit" "$@"
    rc=$?
    say "END $name rc=$rc in $(( $(date +%s) - began ))s"
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - began ))}" \
        >>"$WORK/steps.jsonl"
    return $rc
}

# The inferno command, with the edge profile and the models this script registers.
INFERNO=("$PY" -m inferno.kernel --profile edge --config "$CONFIG")

# Make the CUDA libraries the built llama.cpp links to loadable: the toolkit's, or those of
# the nvidia-* Python packages (nvidia/cu13/lib) when that is where cuBLAS was found.
find_libs() {
    local lib missing dir
    lib=$(ls "$SITE"/llama_cpp/lib/libggml-cuda.so 2>/dev/null) || return 0
    missing=$(ldd "$lib" | awk '/not found/ {print $1}')
    for name in $missing; do
        for dir in $("$PY" -c 'import nvidia; print(*nvidia.__path__)' 2>/dev/null) \
                   ${CUBLAS_SEARCH:-} /usr/local /opt; do
            found=$(find "$dir" -name "$name" -print -quit 2>/dev/null)
            if [[ -n $found ]]; then
                export LD_LIBRARY_PATH=$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
                break
            fi
        done
    done
    say "libggml-cuda.so needs, LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}:"
    ldd "$lib" | grep -E 'cuda|cublas|not found' || true
}

main() {
    say "Inferno GPU check: GPU=$GPU OUT=$OUT TOTAL_S=$TOTAL_S python=$PY"
    say "repository $(git rev-parse HEAD 2>/dev/null || echo '?'); Inferno wheel from" \
        "$(cat .whl/INFERNO_COMMIT 2>/dev/null || echo '?')"
    uname -a; nproc; free -g | head -2
    "$PY" --version
    if [[ $GPU == 1 ]]; then
        nvidia-smi || say "nvidia-smi failed"
        nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv || true
        nvcc --version || say "no nvcc"
        cmake --version | head -1; ninja --version
        "$PY" -m pip show scikit-build-core 2>/dev/null | head -2
    fi

    # Wheels into a folder of their own; llama-cpp-python comes later (built here, or the
    # rehearsal's own).
    rm -rf "$SITE"
    step install-wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --target "$SITE" .whl/*.whl || return 1
    export PYTHONPATH=$SITE
    export PATH=$SITE/bin:$PATH

    # The CUDA build runs in the background while the model is written. ONNX comes last: the
    # edge profile enables the gguf backend too, so nothing starts without llama-cpp-python.
    local build_pid="" model_pid
    if [[ $GPU == 1 && $PREBUILT_ONLY != 1 ]]; then
        rm -rf "$WORK/wheels"
        # Leave ~160 s for everything after the build.
        local build_limit=$(( $(left) - 160 ))
        say "CUDA build of llama-cpp-python in the background (limit ${build_limit}s," \
            "log in build.log)"
        step build-llama-cuda "$build_limit" bash contrib/gpu/build_llama_cuda.sh \
            .whl/llama_cpp_python-*.tar.gz "$WORK/wheels" >"$OUT/build.log" 2>&1 &
        build_pid=$!
    fi
    step make-model 150 "$PY" contrib/gpu/make_model.py "$WORK/model-f16.gguf" \
        "${MODEL_ARGS[@]}" >"$WORK/make_model.out" 2>&1 &
    model_pid=$!

    wait "$model_pid"; cat "$WORK/make_model.out"
    local llama_from="rehearsal: the llama-cpp-python installed for $PY"
    if [[ $PREBUILT_ONLY == 1 ]]; then
        install_prebuilt && llama_from="PREBUILT elsewhere ($PREBUILT), no build here"
    elif [[ -n $build_pid ]]; then
        if wait "$build_pid"; then
            "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
                "$WORK"/wheels/llama_cpp_python-*.whl
            llama_from="built here with CUDA (contrib/gpu/build_llama_cuda.sh)"
        else
            say "the CUDA build failed or ran out of time; its last lines:"
            grep -E '^\[(build|[0-9])' "$OUT/build.log"
            tail -40 "$OUT/build.log"
            if install_prebuilt; then
                llama_from="PREBUILT elsewhere ($PREBUILT), the build here did not finish"
            else
                llama_from="none: the build failed and there is no prebuilt wheel"
            fi
        fi
        grep -E '^\[(build|[0-9])' "$OUT/build.log"
    fi
    say "llama-cpp-python: $llama_from"
    echo "$llama_from" >"$WORK/llama_from.txt"
    if [[ $llama_from != none* ]]; then
        gguf_checks
    fi
    onnx_checks
    [[ $llama_from != none* ]]
}

# build_llama_cuda.sh's build made on another machine by `PREBUILD=1 prepare.sh` (nvcc 13.0,
# GGML_NATIVE=OFF, cuBLAS from the nvidia-cublas wheel), its libraries xz-packed.
install_prebuilt() {
    [[ -f $PREBUILT ]] || return 1
    say "installing $PREBUILT"
    "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="tar")' \
        "$PREBUILT" "$SITE"
}

onnx_checks() {
    say "ONNX: which onnxruntime this python has, and what it offers"
    "$PY" -m pip list 2>/dev/null | grep -i -E '^(onnx|onnxruntime)' || true
    "$PY" -m pip show onnxruntime-gpu 2>&1 | head -2
    "$PY" - <<'EOF' | tee "$WORK/ort.json"
import json, os, onnxruntime as ort
capi = os.path.join(os.path.dirname(ort.__file__), "capi")
print(json.dumps({"version": ort.__version__, "device": ort.get_device(),
                  "available_providers": ort.get_available_providers(),
                  "provider_libraries": sorted(f for f in os.listdir(capi)
                                               if "providers" in f)}))
EOF
    say "ONNX: can this machine reach a package registry for onnxruntime-gpu?"
    "$PY" -m pip config list 2>/dev/null || true
    timeout 30 "$PY" -m pip index versions --retries 0 --timeout 5 onnxruntime-gpu \
        >"$WORK/registry.out" 2>&1
    echo "{\"rc\": $?}" >"$WORK/registry.json"
    grep -v '^WARNING: Location' "$WORK/registry.out" | tail -4
    say "ONNX: MiniLM through Inferno's onnx backend, CUDA requested first"
    step onnx-providers 60 "$PY" contrib/gpu/onnx_providers.py gpu-minilm \
        --config "$CONFIG" --set 'logging.level="warning"' \
        --set 'backends.onnx.providers=["CUDAExecutionProvider","CPUExecutionProvider"]' \
        >"$WORK/onnx_providers.out"
    cat "$WORK/onnx_providers.out"
    grep '^{"onnxruntime"' "$WORK/onnx_providers.out" >"$WORK/onnx_providers.json"
    local cuda_first='backends.onnx.providers=["CUDAExecutionProvider","CPUExecutionProvider"]'
    step onnx-bench 60 "${INFERNO[@]}" --set 'logging.level="warning"' --set "$cuda_first" \
        bench gpu-minilm --json --runs 3 | tee "$WORK/onnx_bench.json"
    # Seen on an H200 with the llama-cpp-python built there: once its libggml-cuda.so is
    # loaded, importing ml_dtypes (which onnx imports, and Inferno imports onnx to describe an
    # ONNX file) dies with a segmentation fault in ml_dtypes/_finfo.py (float4_e2m1fn). So
    # the import order is checked on its own, and the bench repeated with ml_dtypes first.
    step import-order 30 "$PY" -c 'import llama_cpp, ml_dtypes; print("llama_cpp then ml_dtypes: ok")'
    step onnx-bench-ml-dtypes-first 60 "$PY" -c \
        'import sys, ml_dtypes; from inferno.kernel.cli import main; main(sys.argv[1:])' \
        --profile edge --config "$CONFIG" --set 'logging.level="warning"' --set "$cuda_first" \
        bench gpu-minilm --json --runs 3 | tee "$WORK/onnx_bench_ml_dtypes_first.json"
}

gguf_checks() {
    find_libs
    "$PY" - <<'EOF' | tee "$WORK/llama.json"
import json, llama_cpp
print(json.dumps({"llama_cpp_python": llama_cpp.__version__,
                  "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
                  "system_info": llama_cpp.llama_print_system_info().decode()}))
EOF
    step quantize 120 "${INFERNO[@]}" convert "$WORK/model-f16.gguf" "$WORK/model-q4_k_m.gguf" \
        --quantize Q4_K_M --overwrite 2>&1 | grep -v '^\[ *[0-9]*/ *[0-9]*\]' || true
    [[ -f $WORK/model-q4_k_m.gguf ]] || cp "$WORK/model-f16.gguf" "$WORK/model-q4_k_m.gguf"
    step models-info 60 "${INFERNO[@]}" models info gpu-bench --json | tee "$WORK/models_info.json"

    # About 520 prompt tokens: the random model's vocabulary spells most of the bench's
    # sentence byte by byte, so --prompt-tokens 120 gives some 520 tokens (the JSON says).
    local bench=(bench gpu-bench --json --runs 3 --prompt-tokens 120)
    step bench-gpu 90 "${INFERNO[@]}" --set 'backends.gguf.gpu_layers="all"' "${bench[@]}" \
        --tokens 128 | tee "$WORK/bench_gpu.json"
    # llama.cpp's own account of the same load (Inferno reads it from the log it captures).
    step llama-offload 60 "$PY" -c 'import sys, llama_cpp
llama_cpp.Llama(sys.argv[1], n_gpu_layers=-1, n_ctx=512, verbose=True)' \
        "$WORK/model-q4_k_m.gguf" 2>&1 | grep -E '^\[|offload|model buffer|KV buffer|using device' \
        | tee "$WORK/llama_offload.txt"
    # CPU only: the GPU hidden, or llama.cpp would still send big prompt batches to it.
    step bench-cpu 150 env CUDA_VISIBLE_DEVICES= "${INFERNO[@]}" --set 'backends.gguf.gpu_layers=0' \
        "${bench[@]}" --tokens 64 | tee "$WORK/bench_cpu.json"
    step bench-gpu-f16 60 "${INFERNO[@]}" --set 'backends.gguf.gpu_layers="all"' bench gpu-bench-f16 \
        --json --runs 3 --prompt-tokens 120 --tokens 128 | tee "$WORK/bench_gpu_f16.json"
}

write_config() {
    cat >"$CONFIG" <<EOF
# Written by contrib/gpu/check_backends.sh: the models it benches.
[plugins.models.entries.gpu-bench]
path = "$WORK/model-q4_k_m.gguf"
description = "random-weight llama, ~0.85B parameters, Q4_K_M"

[plugins.models.entries.gpu-bench-f16]
path = "$WORK/model-f16.gguf"
description = "the same model in F16"

[plugins.models.entries.gpu-minilm]
path = "$ROOT/.whl/minilm/model.onnx"
description = "all-MiniLM-L6-v2 int8, carried in .whl/minilm"
options = { tokenizer = "tokenizer.json" }
EOF
}

summarize() {
    "$PY" - "$WORK" "$OUT/summary.json" <<'EOF'
import json, sys
from pathlib import Path
work, target = Path(sys.argv[1]), Path(sys.argv[2])

def load(name):
    path = work / name
    try:
        text = path.read_text()
        start = text.index("{")
        return json.loads(text[start:text.rindex("}") + 1])
    except (OSError, ValueError):
        return None

steps = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines()
         if line.strip()] if (work / "steps.jsonl").exists() else []
llama_from = (work / "llama_from.txt").read_text().strip() if (work / "llama_from.txt").exists() \
    else None
summary = {
    "steps": steps, "llama_cpp_python_from": llama_from, "llama": load("llama.json"),
    "model": load("make_model.out"), "models_info": load("models_info.json"),
    "bench_gpu_q4_k_m": load("bench_gpu.json"), "bench_cpu_q4_k_m": load("bench_cpu.json"),
    "bench_gpu_f16": load("bench_gpu_f16.json"),
    "onnxruntime": load("ort.json"), "onnx_registry_reachable": None,
    "onnx_providers": load("onnx_providers.json"), "onnx_bench": load("onnx_bench.json"),
    "onnx_bench_ml_dtypes_first": load("onnx_bench_ml_dtypes_first.json"),
    "llama_offload_log": [line for line in (work / "llama_offload.txt").read_text().splitlines()
                          if not line.startswith("[")]
    if (work / "llama_offload.txt").exists() else None,
}
registry = load("registry.json")
if registry is not None:
    summary["onnx_registry_reachable"] = registry["rc"] == 0
gpu, cpu = summary["bench_gpu_q4_k_m"], summary["bench_cpu_q4_k_m"]
if gpu and cpu:
    summary["gpu_over_cpu"] = {
        key: round(gpu[key] / cpu[key], 1) if cpu.get(key) else None
        for key in ("decode_tokens_per_second", "prompt_tokens_per_second")}
target.write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
EOF
}

{
    write_config
    main
    say "main rc=$?"
    summarize
    say "done in $(( $(date +%s) - START ))s"
} 2>&1 | tee "$OUT/gpu.log"
