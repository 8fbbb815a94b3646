#!/usr/bin/env bash
# Build a llama-cpp-python wheel with CUDA from its source distribution.
#
#   contrib/gpu/build_llama_cuda.sh SDIST WHEEL_DIR
#
# Environment: PYTHON (default python3; needs scikit-build-core, cmake and ninja, the build runs
# without build isolation so no registry is needed), CUDA_ARCHS (default 90-real: Hopper, the
# H100 and H200), JOBS (default: every core), EXTRA_CMAKE_ARGS (appended), CUBLAS_SEARCH (more
# folders to look for cuBLAS in), BUILD_DIR (default /tmp/llama-cuda-build; kept, so a second
# build on the same machine only recompiles what changed; the source is unpacked beside it).
#
# What keeps the build short: one GPU architecture instead of llama.cpp's seven, and
# GGML_CUDA_FA=OFF, which compiles the FlashAttention template instances (over half of the
# ~144 CUDA files) as empty kernels; and LLAVA_BUILD=OFF, which skips the multimodal library
# (mtmd: llama-cpp-python loads it only for image chat handlers, which Inferno does not use).
# A wheel built so runs attention without FlashAttention on the GPU: leave the gguf backend's
# flash_attention at its default, false.
#
# cuBLAS and the driver library are found wherever the machine keeps them: in the CUDA
# toolkit, or in the nvidia-* Python packages that PyTorch installs (nvidia/cu13/...). When
# they are outside the toolkit, their paths are passed to CMake explicitly.
set -euo pipefail

sdist=${1:?usage: build_llama_cuda.sh SDIST WHEEL_DIR}
wheels=${2:?usage: build_llama_cuda.sh SDIST WHEEL_DIR}
python=${PYTHON:-python3}
archs=${CUDA_ARCHS:-90-real}
jobs=${JOBS:-$(nproc)}
build_dir=${BUILD_DIR:-/tmp/llama-cuda-build}

say() { echo "[build $(date -u +%H:%M:%S)] $*"; }

nvcc_bin=$(command -v nvcc) || { say "no nvcc on PATH"; exit 2; }
top=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
top=$(cd "${top:-$(dirname "$(readlink -f "$nvcc_bin")")/..}" && pwd)
say "nvcc $nvcc_bin, toolkit $top"

extra=()
# cuBLAS: the toolkit's own, else the first cublas_v2.h in the Python nvidia packages or /opt.
header=""
for dir in "$top/include" "$top/targets/x86_64-linux/include"; do
    [[ -f $dir/cublas_v2.h ]] && header=$dir/cublas_v2.h && break
done
if [[ -z $header ]]; then
    roots=$("$python" -c 'import nvidia; print(*nvidia.__path__)' 2>/dev/null || true)
    for root in ${CUBLAS_SEARCH:-} $roots /usr/local /usr/include /opt; do
        [[ -d $root ]] || continue
        header=$(find "$root" -name cublas_v2.h -print -quit 2>/dev/null || true)
        [[ -n $header ]] && break
    done
    [[ -n $header ]] || { say "cuBLAS not found (no cublas_v2.h)"; exit 2; }
    include=$(dirname "$header")
    libdir=""
    for dir in "$include/../lib" "$include/../lib64"; do
        compgen -G "$dir/libcublas.so*" >/dev/null && libdir=$(cd "$dir" && pwd) && break
    done
    [[ -n $libdir ]] || { say "cuBLAS headers at $include but no libcublas.so beside them"; exit 2; }
    lib() { ls "$libdir/$1.so" 2>/dev/null || ls "$libdir/$1".so.[0-9]* | sort | tail -1; }
    extra+=("-DCUDA_cublas_LIBRARY=$(lib libcublas)" "-DCUDA_cublasLt_LIBRARY=$(lib libcublasLt)"
            "-DCMAKE_CUDA_FLAGS=-I$include" "-DCMAKE_CXX_FLAGS=-I$include")
    say "cuBLAS outside the toolkit: $include, $libdir"
else
    say "cuBLAS in the toolkit: $header"
fi

# The driver library, for CUDA's virtual memory management (the faster memory pool).
driver=""
for candidate in "$top/lib64/stubs/libcuda.so" "$top/targets/x86_64-linux/lib/stubs/libcuda.so" \
                 $(ldconfig -p 2>/dev/null | awk '/libcuda\.so/ {print $NF}') \
                 /usr/local/nvidia/lib64/libcuda.so /usr/local/nvidia/lib64/libcuda.so.1; do
    [[ -f $candidate ]] && driver=$candidate && break
done
if [[ -n $driver ]]; then
    extra+=("-DCUDA_cuda_driver_LIBRARY=$driver")
    say "driver library: $driver"
else
    extra+=("-DGGML_CUDA_NO_VMM=ON")
    say "no libcuda.so to link: building with GGML_CUDA_NO_VMM=ON"
fi

args=(-DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=$archs" -DGGML_CUDA_FA=OFF
      -DGGML_CUDA_FA_ALL_QUANTS=OFF -DGGML_CUDA_NCCL=OFF -DGGML_CUDA_COMPRESSION_MODE=none
      -DGGML_CCACHE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAVA_BUILD=OFF
      "${extra[@]}"
      ${EXTRA_CMAKE_ARGS:-})
# scikit-build-core splits CMAKE_ARGS like a shell, so no argument may hold a space.
export CMAKE_ARGS="${args[*]}"
export CMAKE_BUILD_PARALLEL_LEVEL=$jobs
say "CMAKE_ARGS=$CMAKE_ARGS"
say "CMAKE_BUILD_PARALLEL_LEVEL=$jobs, build dir $build_dir"
mkdir -p "$wheels"
started=$(date +%s)
# Unpacked to a fixed folder (pip would copy it to a new random one each time), so that the
# kept build folder matches its source on a second build.
src=$build_dir-src
if [[ ! -f $src/pyproject.toml ]]; then
    mkdir -p "$src" && tar xzf "$sdist" -C "$src" --strip-components=1
fi
"$python" -m pip wheel -v --no-deps --no-build-isolation --no-index -w "$wheels" \
    --config-settings="build-dir=$build_dir" "$src"
say "built in $(( $(date +%s) - started )) s: $(ls "$wheels"/llama_cpp_python-*.whl)"
