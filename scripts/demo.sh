#!/usr/bin/env bash
# Set up .venv, generate a demo Qwen-MoE-style checkpoint, then pack, inspect, verify, unpack
# (byte-identical, checked with sha256sum) and stream text from the archive.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
d=demo
rm -rf "$d" && mkdir -p "$d"
echo "== generating a demo checkpoint in $d/model"
python -m zipmoe_pack.synth demo "$d/model"
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
echo "== zipmoe-run with a memory budget of 30 % of the experts (weights are random: the text is gibberish)"
zipmoe-run "$d/model.zmoe" --prompt "Mixture of experts models" --max-new-tokens 24 --greedy --memory-budget 30%
