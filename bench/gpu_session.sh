#!/usr/bin/env bash
# Run benchmark lanes in parallel, one GPU each, on a multi-GPU machine whose Python already has torch.
#
#   SCRIPTREEL_COMMIT=$(git rev-parse --short HEAD) OUT=/path/out \
#     bash bench/gpu_session.sh SECONDS 'lane for GPU 0' 'lane for GPU 1' ...
#
# A lane is a shell command (benchmarks one after the other) run with CUDA_VISIBLE_DEVICES set to its
# GPU (lane i on GPU i modulo the GPU count), so with as many GPUs as lanes timings never share a GPU;
# lanes share the CPU and the disk (pin them with taskset where the CPU matters). Before the lanes start, the
# wheels in .whl/ (if any) are installed into /tmp/site (machines that cannot download, see
# bench/README.md), the tiny models are built, and the full-size model folders the lanes name
# (glm, svd, cogvideox) are built in parallel, one GPU each, so no two lanes build the same folder.
# Every lane is stopped SECONDS after the script started; their logs end up in $OUT/logs.tgz.
set -u
DEADLINE=$(($(date +%s) + ${1:?seconds}))
shift
OUT=${OUT:?set OUT to the results folder}
WORK=${WORKDIR:-/tmp/scriptreel-bench}
mkdir -p "$OUT" "$WORK/lanes"
export OUT WORK
if [ -z "${NO_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 CUDA_MODULE_LOADING=LAZY
python3 -m tiny_models models >"$WORK/lanes/tiny_models.log" 2>&1 || { tail -20 "$WORK/lanes/tiny_models.log"; exit 1; }

build() {  # build <gpu> <folder> <python statement>
  [ -e "$WORK/$2/model_index.json" ] || [ -e "$WORK/$2/config.json" ] && return 0
  CUDA_VISIBLE_DEVICES=$1 python3 -c "from pathlib import Path; import bench.fullsize as f; $3" \
    >"$WORK/lanes/build-$2.log" 2>&1 || echo "build of $2 failed: $(tail -3 "$WORK/lanes/build-$2.log")"
}
started=$(date +%s)
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
gpus=$((gpus > 0 ? gpus : 1))
all="$*"
python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || all=""  # CPU dry run: no builds
[[ $all == *compat* || $all == *bench.llm* || $all == *decode_profile* || $all == *tests/gpu* ]] &&
  build $((0 % gpus)) glm "f.build_glm(Path('$WORK/glm'), tokenizer_dir=Path('models/llm'))" &
[[ $all == *compat* || $all == *video* ]] && build $((1 % gpus)) svd "f.build_svd_xt(Path('$WORK/svd'))" &
[[ $all == *cogvideox* ]] && build $((2 % gpus)) cogvideox "f.build_cogvideox_2b(Path('$WORK/cogvideox'), tokenizer_dir=Path('models/t2v/tokenizer'))" &
wait
echo "model folders ready in $(($(date +%s) - started)) s"

gpu=0
for lane in "$@"; do
  left=$((DEADLINE - $(date +%s)))
  (CUDA_VISIBLE_DEVICES=$((gpu % gpus)) timeout --signal=INT --kill-after=20 "$left" bash -c "$lane" \
    >"$WORK/lanes/lane$gpu.log" 2>&1; echo "lane $gpu exited $? after $(($(date +%s) - started)) s") &
  gpu=$((gpu + 1))
done
wait
for log in "$WORK"/lanes/lane*.log; do
  echo "== $log"
  tail -5 "$log"
done
tar -czf "$OUT/logs.tgz" -C "$WORK" lanes $(cd "$WORK" && ls -d logs* 2>/dev/null) 2>/dev/null
true
