#!/usr/bin/env bash
# The GPU machine's checks in one command (the machine is lent for minutes and released when
# idle, so a session batches its checks): each stage writes its full log under $OUT (or
# ./gpu-checks-out) and prints a short summary. From the repository root on the GPU machine:
#   source .devnode/enter.sh && scripts/gpu-checks.sh suite variants lora quantize
# Stages:
#   suite     npm run test:gpu (vitest's gpu project)
#   variants  bench/variants.ts over $VARIANTS (default: bf16 and 4-bit, 8 and 0 adapters)
#   pinsweep  $VARIANTS (default a8) pinned to each CPU pair in turn ($PIN_SWEEP), compact lines
#   lora      bench/kernels.ts --only lora (decode LoRA microbenchmarks)
#   quantize  the `inlaid quantize` CLI itself on the demo, on the GPU, then its eval
#   profile   ncu's duration of every kernel of a short `inlaid bench` ($PROFILE_CONFIG, default
#             llama-2-7b-gptq4; 8 adapters, prompt 16, 8 tokens, eager decode steps), one CSV;
#             bench/kernel_profile.ts sums it
#   qgemm     ncu's throughput, stall and occupancy sections of one 4-bit GEMM (up) at 32 and 1 rows
#             ($QGEMM_ROWS: other row counts)
#   qgemm-torch  the same for torch's int4 kernel (tinygemm) at 1 row
#   expand    the same for one launch of the all-slots decode LoRA expand (o, 32 rows x 32 adapters)
# SUITE_TIMEOUT / VARIANTS_TIMEOUT (seconds, default 330 / 300) bound those stages.
# PIN_CPUS (e.g. 2-3): the variants stage runs on those cores only (taskset; its runs inherit
# the affinity), to see whether the host time per step varies with the core a run lands on.
# A stage that fails does not stop the others; the exit status is the number that failed.
set -uo pipefail
out=${OUT:-gpu-checks-out}
mkdir -p "$out"
failed=0
run() { # name, timeout seconds, command...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc $rc, $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || failed=$((failed + 1))
  return $rc
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# Nsight Compute, for the profile and qgemm stages (on PATH or in its install folder).
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
# The ncu sections and metrics of the one-kernel profile stages (qgemm, qgemm-torch, expand),
# and the lines of their reports they print.
kernel_ncu=(--clock-control none --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy
  --section LaunchStats --section MemoryWorkloadAnalysis
  --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio',sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,lts__t_bytes.sum,dram__bytes_read.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum)
kernel_lines="Duration|stalled_(wait|math|long|short|barrier|not_sel|mio|no_inst|dispatch)|hmma|bytes|Eligible|Issued|Occupancy|Grid Size|Block Size"
for stage in "$@"; do
  case $stage in
    suite)
      run suite "${SUITE_TIMEOUT:-330}" node node_modules/vitest/vitest.mjs run --project gpu
      grep -E "Test Files|Tests  | FAIL |×" "$out/suite.log" | head -30 ;;
    variants)
      pin=()
      if [ -n "${PIN_CPUS:-}" ]; then
        if command -v taskset >/dev/null; then pin=(taskset -c "$PIN_CPUS"); else echo "PIN_CPUS: taskset is not installed; running unpinned" >&2; fi
      fi
      # shellcheck disable=SC2086
      run variants "${VARIANTS_TIMEOUT:-300}" "${pin[@]}" node --import tsx bench/variants.ts ${VARIANTS:-a8 a0@llama-2-7b/0 q8@llama-2-7b-gptq4 q0@llama-2-7b-gptq4/0}
      grep '^{' "$out/variants.log" ;;
    pinsweep)
      # The host-time spread against the cores a run is pinned to: $VARIANTS (default a8) once
      # per CPU set of $PIN_SWEEP (default the pairs 0-1 2-3 ... of this machine), $SWEEP_ROUNDS
      # times (default 2), one compact line per run (all in pinsweep.log).
      ncpu=$(nproc)
      sets=${PIN_SWEEP:-$(for ((c = 0; c + 1 < ncpu; c += 2)); do printf '%s ' "$c-$((c + 1))"; done)}
      command -v lscpu >/dev/null && lscpu -e=CPU,CORE,SOCKET,NODE,MAXMHZ 2>/dev/null | head -40 >"$out/topology.txt"
      nvidia-smi topo -m >>"$out/topology.txt" 2>&1
      : >"$out/pinsweep.log"
      for ((round = 1; round <= ${SWEEP_ROUNDS:-2}; round++)); do
        for set in $sets; do
          # shellcheck disable=SC2086
          timeout 120 taskset -c "$set" node --import tsx bench/variants.ts ${VARIANTS:-a8} 2>/dev/null |
            grep '^{' | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{for(const l of s.trim().split("\n").filter(Boolean)){const j=JSON.parse(l);console.log(JSON.stringify({pin:process.argv[1],round:+process.argv[2],variant:j.variant,step_ms:j.decode_step_ms,host_us:j.host_us_per_decode_step,host_p50:j.host_p50_us,idle_us:j.device_idle_us_per_decode_step,ph:j.host_phase_p50_us&&{pr:j.host_phase_p50_us.prepare,fw:j.host_phase_p50_us.forward,tk:j.host_phase_p50_us.tokens,sc:j.host_phase_p50_us.schedule}}))}})' "$set" "$round" |
            tee -a "$out/pinsweep.log"
        done
      done
      grep -c . "$out/pinsweep.log" ;;
    lora)
      # shellcheck disable=SC2086
      run lora 90 node --import tsx bench/kernels.ts --only lora ${LORA_CASES:+--lora-cases $LORA_CASES}
      grep '^{' "$out/lora.log" | tail -c 6000 ;;
    quantize)
      d=examples/demo
      run quantize 240 node --import tsx src/cli/main.ts quantize --device cuda --model $d/base --method mlgptq --bits 4 --group-size 64 \
        --task reverse=$d/adapters/reverse:$d/data/reverse/calib.jsonl --task sort=$d/adapters/sort:$d/data/sort/calib.jsonl \
        --task caesar=$d/adapters/caesar:$d/data/caesar/calib.jsonl --task mirror=$d/adapters/mirror:$d/data/mirror/calib.jsonl \
        --out "$out/demo-4bit" && tail -3 "$out/quantize.log"
      for t in reverse sort caesar mirror; do
        run "eval-$t" 120 node --import tsx src/cli/main.ts eval --device cuda --model "$out/demo-4bit" --adapter $t=$d/adapters/$t \
          --data $d/data/$t/eval.jsonl --json && grep "^{" "$out/eval-$t.log" | cut -c1-200
      done
      rm -rf "$out/demo-4bit" ;;
    profile)
      # Kernels run one at a time under ncu (no PDL overlap, no launch gaps): per-kernel device
      # time of each kind, not the step's wall time. Caches are left warm as in a real step.
      cfg=${PROFILE_CONFIG:-llama-2-7b-gptq4}
      # Decode steps run eagerly (INLAID_CUDA_GRAPHS=0): ncu does not see the kernels of graphs
      # launched from the device, and a short prompt keeps prefill out of the way.
      INLAID_CUDA_GRAPHS=0 run "profile-$cfg" 300 "$ncu" --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv \
        node --import tsx src/cli/main.ts bench --config "$cfg" --device cuda --json --gen 8 --prompt-len 16
      grep -c '"gpu__time_duration.sum"' "$out/profile-$cfg.log" ;;
    qgemm)
      # Why the 4-bit GEMM at 32 rows takes ~2.7x its byte floor: ncu's stall and throughput
      # sections for one launch of the up projection (4096 -> 11008) at $QGEMM_ROWS rows (default
      # 32 and 1). The launch is fixed (4 warps x 4 splits, the tuner's pick at both) so no tuning
      # candidate is the one profiled; the first launch is the eager warm-up.
      for r in ${QGEMM_ROWS:-32 1}; do
        INLAID_QGEMM_WARPS=4 INLAID_QGEMM_SPLITS=4 run "qgemm-ncu-r$r" 100 "$ncu" "${kernel_ncu[@]}" -k regex:quant_gemm_b4 --launch-skip 1 \
          --launch-count 1 node --import tsx bench/quant_gemm.ts --bits 4 --rows "$r" --shapes up --no-cublas --no-memory --reps 2 --iters 1
        grep -E "$kernel_lines" "$out/qgemm-ncu-r$r.log" | head -40
      done ;;
    qgemm-torch)
      # The same sections for torch's int4 kernel (tinygemm) at one row, beside ours:
      # `QGEMM_ROWS=1 scripts/gpu-checks.sh qgemm qgemm-torch`. A fit of time = fixed + bytes /
      # rate over the five decode shapes gave torch ~2.8 us of fixed cost per call, ours ~6.6
      # (H100, session 12). torch_int4.py runs every shape; its first (up, 1 row) is profiled,
      # after one warm-up launch.
      run qgemm-ncu-torch-r1 150 "$ncu" "${kernel_ncu[@]}" -k regex:tinygemm --launch-skip 1 --launch-count 1 \
        python3 bench/peers/torch_int4.py --rows 1 --reps 2 --iters 1
      grep -E "$kernel_lines" "$out/qgemm-ncu-torch-r1.log" | head -40 ;;
    expand)
      # Where the o projection's LoRA time goes (issue 3's open line: ~6.2 us over the GEMM, the
      # expand ~4.6 of it, in graph replays): the expand kernel alone under ncu. Its duration
      # there against the replayed figure separates the kernel's own latency from the launch
      # boundary after the cuBLASLt GEMM. bench/kernels.ts runs o first; the first launch is
      # its eager warm-up.
      run expand-ncu 150 "$ncu" "${kernel_ncu[@]}" -k regex:lora_bgmv_expand_slots --launch-skip 1 --launch-count 1 \
        node --import tsx bench/kernels.ts --only lora --lora-cases 32x32x16 --reps 2 --iters 1
      grep -E "$kernel_lines" "$out/expand-ncu.log" | head -40 ;;
    *) echo "unknown stage $stage (suite, variants, lora, quantize, profile, qgemm, qgemm-torch, expand)" >&2; failed=$((failed + 1)) ;;
  esac
done
exit $failed
