#!/usr/bin/env bash
# The benchmarks' llama.cpp peer (the `llamacpp` extra): build llama-cpp-python 0.3.36 from its PyPI source
# distribution once (CPU; 7-20 minutes on 2 cores), keep the wheel in the user's cache, and install it into
# .venv with its small pure-Python dependencies and `gguf` (the benchmarks' GGUF exporter).
# For users and benchmark machines; CI does not need it (the tests that use llama.cpp skip without it).
#   bash scripts/llamacpp.sh            # build (once) and install
#   ZIPMOE_CACHE=/path bash scripts/llamacpp.sh
# A build with other options (CMAKE_ARGS) is cached apart from the native one. LLAMACPP_TARGET=DIR installs
# the library into DIR instead of .venv (put DIR first on PYTHONPATH for one run), e.g. the AVX2-only peer
# of an emulated AVX2 benchmark on an AVX-512 host:
#   CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF \
#     -DGGML_AVX512_BF16=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_VBMI=OFF" LLAMACPP_TARGET=/tmp/llavx2 \
#     bash scripts/llamacpp.sh
set -euo pipefail
cd "$(dirname "$0")/.."
version=0.3.36
cache="${ZIPMOE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/zipmoe}/wheels"
if [ -n "${CMAKE_ARGS:-}" ]; then  # a wheel built with other options must not be taken for the native one
  cache="$cache/cmake-$(printf '%s' "$CMAKE_ARGS" | sha256sum | cut -c1-12)"
fi
if [ ! -x .venv/bin/python ]; then
  echo "error: no .venv here; run bash scripts/setup.sh first" >&2
  exit 2
fi
. .venv/bin/activate
mkdir -p "$cache"
wheel=$(ls "$cache"/llama_cpp_python-$version-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  echo "building llama-cpp-python $version from source into $cache (CPU build; this takes a while) ..." >&2
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # The default build is native (tuned to this CPU), as a user's own build is; CMAKE_ARGS from the
  # environment is honoured (CMAKE_ARGS=-DGGML_NATIVE=OFF gives a portable wheel).
  # --no-cache-dir: pip's own cache of built wheels is keyed by the source distribution, not by CMAKE_ARGS,
  # so a second build with other options would otherwise get the first build's wheel back
  python -m pip wheel --no-cache-dir --no-deps --no-binary :all: "llama-cpp-python==$version" -w "$tmp"
  mv "$tmp"/llama_cpp_python-$version-*.whl "$cache"/
  wheel=$(ls "$cache"/llama_cpp_python-$version-*.whl | head -n 1)
fi
if [ -n "${LLAMACPP_TARGET:-}" ]; then
  python -m pip install -q --no-deps --upgrade --target "$LLAMACPP_TARGET" "$wheel"
  PYTHONPATH="$LLAMACPP_TARGET" python -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'in', '$LLAMACPP_TARGET:', llama_cpp.llama_print_system_info().decode())"
  exit 0
fi
python -m pip install -q --no-deps "$wheel"
python -m pip install -q "typing-extensions>=4.5" "numpy>=1.20" "diskcache>=5.6.1" "jinja2>=2.11.3" "gguf>=0.10" \
    fastapi sse-starlette starlette-context pydantic-settings  # llama_cpp.server, for zipmoe bench serve --llamacpp
python -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'installed from', '$wheel')"
