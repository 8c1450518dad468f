#!/usr/bin/env bash
# Prepare the wheel folder an offline GPU node installs from (tools/gpu_check.py --wheels DIR).
# Run it where pip reaches a package index; it downloads, without dependencies, the wheels for
# CPython 3.12 on x86-64 Linux of what megatron_lcl needs and such a node lacks (docs/gpu.md):
#
#   bash tools/gpu_wheels.sh            # -> .whl/ (git-ignored), ~2.7 MB
#   bash tools/gpu_wheels.sh DIR        # another folder
#   GPU_WHEELS="megatron-core==0.16.1 ..." bash tools/gpu_wheels.sh   # another list
#
# The default list: megatron-core 0.16.1 (the tested version; setup.py's range) and webdataset with
# braceexpand, its one dependency that is not a common package (numpy and pyyaml are on the node).
# Transformer Engine is not in it: its CUDA wheel (~276 MB) is larger than what travels (LIMIT_MB), so on
# such a node gpu_check's part d runs its dry form; run the TE step on a cluster node (docs/gpu.md).
set -euo pipefail
DIR=${1:-.whl}
PY=${PYTHON:-python3}
PACKAGES=${GPU_WHEELS:-megatron-core==0.16.1 webdataset==1.0.2 braceexpand==0.1.7}
LIMIT_MB=64  # what travels with the working tree to the lent GPU machine, all files together

mkdir -p "$DIR"
# shellcheck disable=SC2086  # PACKAGES is a list
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --dest "$DIR" $PACKAGES
ls -l "$DIR"/*.whl
size_kb=$(du -sk "$DIR" | cut -f1)
echo "$DIR: $(ls "$DIR"/*.whl | wc -l) wheels, $((size_kb / 1024)) MB"
if [ "$size_kb" -gt $((LIMIT_MB * 1024)) ]; then
    echo "$DIR is larger than $LIMIT_MB MB: it will not travel to the GPU machine" >&2
    exit 1
fi
