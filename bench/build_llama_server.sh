#!/usr/bin/env bash
# Build llama.cpp's `llama-server` from the llama.cpp sources vendored in the
# llama-cpp-python 0.3.36 sdist: the very llama.cpp the project runs, so the
# benchmark compares daemons, not llama.cpp versions.
#
# Portable build (same flags as the project's llama-cpp-python wheel: a native
# build on CPUs that report AMX crashes in ggml_backend_amx_mul_mat), offline
# (no curl / openssl, no tests, no examples, no web UI download).
#
# Output: bench/.cache/llama-server/bin/llama-server (gitignored). Idempotent:
# exits at once when the binary exists. Prints the binary's path last.
#
# Usage: bench/build_llama_server.sh [--force]
set -euo pipefail

VERSION=0.3.36
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
CACHE="$HERE/.cache"
SRC="$CACHE/llama_cpp_python-$VERSION"  # the sdist's top directory
BUILD="$CACHE/llama-server-build"
OUT="$CACHE/llama-server"
BIN="$OUT/bin/llama-server"
JOBS="${JOBS:-2}"

if [[ "${1:-}" == "--force" ]]; then
    rm -rf "$BUILD" "$OUT"
fi
if [[ -x "$BIN" ]]; then
    echo "$BIN"
    exit 0
fi
mkdir -p "$CACHE"

# 1. The sdist: pip's download (or a copy found in pip's unpack area).
SDIST="$CACHE/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
    found="$(find /tmp ~/.cache/pip -maxdepth 3 -name "llama_cpp_python-$VERSION.tar.gz" 2>/dev/null | head -n1 || true)"
    if [[ -n "$found" ]]; then
        cp "$found" "$SDIST"
    else
        PIP="$REPO/.venv/bin/pip"
        [[ -x "$PIP" ]] || PIP="python3 -m pip"
        $PIP download --no-binary :all: --no-deps --no-build-isolation \
            "llama-cpp-python==$VERSION" -d "$CACHE" >&2 \
            || $PIP download --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$CACHE" >&2
    fi
fi

# 2. Unpack (once).
if [[ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]]; then
    rm -rf "$SRC"
    tar -xzf "$SDIST" -C "$CACHE"
fi
LLAMA="$SRC/vendor/llama.cpp"

# 3. Configure + build the one target.
cmake -S "$LLAMA" -B "$BUILD" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_UI=OFF -DGGML_CCACHE=OFF >&2
cmake --build "$BUILD" --target llama-server -j"$JOBS" >&2

mkdir -p "$OUT/bin"
cp "$BUILD/bin/llama-server" "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
# Record which llama.cpp this is (the sdist ships no .git: the build info header has it).
{
    echo "llama-cpp-python sdist: $VERSION"
    "$BIN" --version 2>&1 | grep -E '^(version|built with)' || true
} > "$OUT/VERSION"
echo "$BIN"
