#!/usr/bin/env bash
# Peak memory and wall time of the user's command, `rtsd export --precision fp16`, on the full-size synthetic SDXL base
# (2.57 B UNet parameters; fp16 file, ~6.9 GB), parity check on (64 px). Big files live in WORK and are deleted
# (KEEP_CHECKPOINT=1 keeps the checkpoint for the next run).
#   benchmarks/sdxl_fp16_cli_export.sh WORK RESULTS_DIR
# Writes RESULTS_DIR/sdxl_fp16_cli_export.{time.txt,log,rss.tsv}: /usr/bin/time -v's report, the export log, and
# VmRSS of the export sampled every second (kills the export past 21 GiB: the machine has 23.5 GiB and no swap).
set -euo pipefail
work=$1 results=$2
lock=${BIGMEM_LOCK:-/tmp/rtsd-bigmem.lock}  # one memory-heavy job at a time on a shared machine
mkdir -p "$work" "$results"
ckpt=$work/sdxl.safetensors out=$work/engines
[ -f "$ckpt" ] || flock "$lock" nice -n 10 python -c "import sys, torch; from rtsd.models.synthetic import \
write_checkpoint; write_checkpoint(sys.argv[1], 'sdxl', seed=0, dtype=torch.float16)" "$ckpt"
cmd=(rtsd export --checkpoint "$ckpt" --output "$out" --precision fp16 --min-size 64 --opt-size 64 --max-size 1024
     --max-batch 1 --force)
echo "flock $lock /usr/bin/time -v ${cmd[*]}" > "$results/sdxl_fp16_cli_export.command.txt"
flock "$lock" nice -n 10 /usr/bin/time -v -o "$results/sdxl_fp16_cli_export.time.txt" "${cmd[@]}" \
  > "$results/sdxl_fp16_cli_export.log" 2>&1 &
top=$!
: > "$results/sdxl_fp16_cli_export.rss.tsv"
descendants() { local p; for p in $(pgrep -P "$1"); do echo "$p"; descendants "$p"; done; }
while kill -0 "$top" 2>/dev/null; do
  for pid in $(descendants "$top"); do
    if [ "$(cat /proc/$pid/comm 2>/dev/null)" = rtsd ]; then
      rss=$(awk '/^VmRSS/ {print $2}' /proc/$pid/status 2>/dev/null || echo 0)
      printf '%s\t%s\t%s\n' "$(date +%T)" "${rss:-0}" "$(tail -c 200 "$results/sdxl_fp16_cli_export.log" | tr '\n' ' ' | tail -c 80)" \
        >> "$results/sdxl_fp16_cli_export.rss.tsv"
      if [ "${rss:-0}" -gt $((21 * 1024 * 1024)) ]; then echo "killing $pid at $rss KiB" >&2; kill "$pid"; fi
    fi
  done
  sleep 1
done
wait "$top" || echo "export exited with $?" >&2
rm -rf "$out"
[ -n "${KEEP_CHECKPOINT:-}" ] || rm -f "$ckpt"
