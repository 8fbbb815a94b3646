#!/usr/bin/env bash
# Build llama.cpp's llama-server from the llama.cpp sources vendored in the llama-cpp-python
# sdist of the version Inferno has installed, so that bench/serve_compare.py compares two
# servers running the same llama.cpp.
#
#     bench/build_llama_server.sh [--python PATH] [--jobs N]
#
# The sdist, sources and build live in bench/.llama-server/<version>/ (ignored by git). A
# second run finds the binary and only prints its path. CPU-only; pass extra cmake options
# in LLAMA_SERVER_CMAKE_ARGS (e.g. "-DGGML_CUDA=on"). The last line printed is the binary's
# path.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="$root/.venv/bin/python"
jobs=2

while [[ $# -gt 0 ]]; do
    case "$1" in
        --python) python="$2"; shift 2 ;;
        --jobs) jobs="$2"; shift 2 ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "build_llama_server.sh: unknown argument '$1' (expected --python PATH or --jobs N)" >&2
           exit 2 ;;
    esac
done

if [[ ! -x "$python" ]]; then
    echo "build_llama_server.sh: no Python at $python; create the venv or pass --python PATH" >&2
    exit 2
fi
if ! version="$("$python" -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null)"; then
    echo "build_llama_server.sh: $python cannot import llama_cpp; install llama-cpp-python first" >&2
    exit 2
fi
for tool in cmake c++ tar; do
    command -v "$tool" >/dev/null || { echo "build_llama_server.sh: '$tool' is not on PATH" >&2; exit 2; }
done

cache="$here/.llama-server/$version"
binary="$cache/build/bin/llama-server"
if [[ -x "$binary" ]]; then
    echo "llama-server $version already built" >&2
    echo "$binary"
    exit 0
fi

mkdir -p "$cache"
sdist="$(ls "$cache"/llama_cpp_python-"$version".tar.gz 2>/dev/null || true)"
if [[ -z "$sdist" ]]; then
    echo "downloading the llama-cpp-python $version sdist" >&2
    "$python" -m pip download --quiet --no-binary :all: --no-deps \
        "llama-cpp-python==$version" -d "$cache"
    sdist="$cache/llama_cpp_python-$version.tar.gz"
fi

source_dir="$cache/llama_cpp_python-$version/vendor/llama.cpp"
if [[ ! -f "$source_dir/CMakeLists.txt" ]]; then
    tar -xzf "$sdist" -C "$cache" "llama_cpp_python-$version/vendor/llama.cpp"
fi

# No web UI: its assets come from npm or a download, and the benchmark only needs the API.
# No OpenSSL: the server listens on loopback only. Static libraries keep the binary whole.
# shellcheck disable=SC2086
cmake -S "$source_dir" -B "$cache/build" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF \
    ${LLAMA_SERVER_CMAKE_ARGS:-} >&2
nice -n 10 cmake --build "$cache/build" --config Release --target llama-server -j "$jobs" >&2

if [[ ! -x "$binary" ]]; then
    echo "build_llama_server.sh: the build finished but $binary is missing" >&2
    exit 1
fi
echo "$binary"
