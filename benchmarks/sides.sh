# Sourced by the side-by-side benchmark scripts (bench_protocol.sh, bench_precision.sh): the output folder, the
# source tree of an earlier revision in $tmp/src (removed on exit), and the machine line every figure is read with.
# Usage: prepare_sides OUT_DIR REV
prepare_sides() {
  mkdir -p "$1"
  export PYTHONWARNINGS=ignore
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  git archive "$2" src | tar -x -C "$tmp"
  echo "CPU: $(lscpu | sed -n 's/^Model name: *//p') family $(lscpu | sed -n 's/^CPU family: *//p') model" \
       "$(lscpu | sed -n 's/^Model: *//p'), $(nproc) cores," \
       "flags:$(grep -o -w 'avx2\|avx512f\|avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
}
