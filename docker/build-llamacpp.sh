#!/usr/bin/env bash
# Builds llama-cpp-python (the llama.cpp peer of `tandem bench --peer llamacpp`) from its PyPI sdist for this host and
# installs it into a virtual environment: `docker/build-llamacpp.sh [VENV]` (default .venv).
#
# GGML_NATIVE stays off: a native build probes the compiler's -march=native, which on hosts with AMX produced a
# library that died with "Illegal instruction" under virtualisation. Instead the instruction sets are named one by one:
# AVX2, FMA and F16C always (any x86-64 from the last decade), AVX-512 with VNNI and BF16 only where this host's
# /proc/cpuinfo lists them, AMX never. The wheel is cached per flag set, so a rebuild is a copy.
set -euo pipefail
VENV="${1:-.venv}"
VERSION="${LLAMACPP_VERSION:-0.3.36}"
has() { grep -qw "$1" /proc/cpuinfo; }
flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF)
if has avx512f && has avx512bw && has avx512vl; then
  flags+=(-DGGML_AVX512=ON)
  has avx512_vnni && flags+=(-DGGML_AVX512_VNNI=ON)
  has avx512_bf16 && flags+=(-DGGML_AVX512_BF16=ON)
else
  flags+=(-DGGML_AVX512=OFF)
fi
tag=$(printf '%s\n' "${flags[@]}" | sha256sum | cut -c1-12)
cache="${TANDEM_CACHE:-$HOME/.cache/tandem}/wheels/llamacpp-$VERSION-$tag"
if ! ls "$cache"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  mkdir -p "$cache"
  echo "building llama-cpp-python $VERSION with: ${flags[*]}"
  CMAKE_ARGS="${flags[*]}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$VENV/bin/pip" wheel --no-deps --no-binary llama-cpp-python --no-cache-dir -w "$cache" "llama-cpp-python==$VERSION"
fi
"$VENV/bin/pip" install --no-deps "$cache"/llama_cpp_python-*.whl
"$VENV/bin/pip" install "numpy" "typing-extensions>=4.5" "diskcache>=5.6.1" "jinja2>=2.11.3"
