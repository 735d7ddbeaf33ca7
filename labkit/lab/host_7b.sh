#!/usr/bin/env bash
# The GPU host's CPU rows on Llama-2-7B's shapes (labkit/lab/host_7b.py), run from the repo root there
# with .carry/ holding site.tar.xz (xllamacpp + gguf) and swiftport-linux.tar.xz (lmport + OpenBLAS).
# $1: the runtimes (comma-separated). Folder and exports in /dev/shm where it holds them (the
# host's disk writes ~75 MB/s), else under build/.
set -uo pipefail
export PYTHONUNBUFFERED=1
mkdir -p /tmp/site /tmp/swiftport
[ -e /tmp/site/xllamacpp ] || tar -xJf .carry/site.tar.xz -C /tmp/site
[ -e /tmp/swiftport/lmport ] || tar -xJf .carry/swiftport-linux.tar.xz -C /tmp/swiftport
export PYTHONPATH=/tmp/site:$PWD LD_LIBRARY_PATH=/tmp/swiftport LABKIT_LMPORT=/tmp/swiftport/lmport
D=build
if [ "$(df --output=avail -B1G /dev/shm 2>/dev/null | tail -1)" -ge 60 ] 2>/dev/null; then D=/dev/shm; fi
export LABKIT_RUNTIME_CACHE=$D/cache
df -h . /dev/shm | tail -2; free -g | head -2; nproc; echo "folder in $D"
python3 -c "import xllamacpp, gguf; print('xllamacpp', xllamacpp.__version__)"
[ -e $D/l7b/model.safetensors ] || { time python3 -m labkit.lab.host_7b --write $D/l7b; }
ls -la $D/l7b
time python3 -m labkit.lab.host_7b --matrix $D/l7b --threads 16 --runtimes "$1" --out "$OUT"
