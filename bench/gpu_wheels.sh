#!/usr/bin/env bash
# Wheels for the GPU session, in parts small enough to travel beside this repository.
#
#   bash bench/gpu_wheels.sh            # onnxruntime-gpu 1.31.1 + transformers 5.23.0
#
# ../shared/tools/device-wheels.sh cuts its tar into 58 MiB parts, which assumes a working tree of
# under 6 MiB; ours carries the 7.7 MB Sudoku checkpoint, and a device call takes 64 MiB in all. This
# runs it, then re-cuts the parts to fit (64 MiB - tree - 2 MiB), keeping its install.sh. Then make
# the calls it prints, back to back: carry [".dwN"], command `true`, and on the last one
#   bash .dwN/install.sh && bash bench/gpu_session.sh check
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p "$(git rev-parse --git-dir)/info"  # device-wheels.sh appends its ignore patterns there
[ -x ../shared/tools/device-wheels.sh ] || { echo "../shared/tools/device-wheels.sh not found" >&2; exit 1; }
[ $# -gt 0 ] || set -- onnxruntime-gpu==1.31.1 transformers==5.23.0
../shared/tools/device-wheels.sh "$@" >/dev/null
tree_mib=$(( ($(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) + 1048575) / 1048576 ))
part_mib=$(( 64 - tree_mib - 2 ))
last=$(ls -d .dw[0-9]* | sort -V | tail -1)
mv "$last/install.sh" .dwsrc/install.sh
cat $(ls .dw[0-9]*/wheels.tar.part-* | sort -t- -k2 -n) > .dwsrc/wheels.tar
rm -rf .dw[0-9]*
split -b "${part_mib}M" -d -a 2 .dwsrc/wheels.tar .dwsrc/wheels.tar.part-
rm .dwsrc/wheels.tar
n=0
for piece in .dwsrc/wheels.tar.part-*; do
  n=$((n + 1))
  mkdir -p ".dw$n"
  mv "$piece" ".dw$n/"
done
mv .dwsrc/install.sh ".dw$n/install.sh"
echo "wheels in $n parts of at most $part_mib MiB (tree: $tree_mib MiB). Device calls, back to back:"
for ((i = 1; i < n; i++)); do echo "  carry [\".dw$i\"]   command: true"; done
echo "  carry [\".dw$n\"]   command: bash .dw$n/install.sh && bash bench/gpu_session.sh check"
echo "then, on the still-warm machine: command: bash bench/gpu_session.sh bench"
