#!/usr/bin/env bash
# Start the FramePack web app.
#
#   bash start.sh [PRESET] [--dry-run] [app flags...]
#
# PRESET (optional, first argument or --preset NAME):
#   default     auto placement from free VRAM; right for most GPUs, including 16 GB cards
#   low-vram    extreme memory saving: streamed transformer, fragmentation-resistant allocator,
#               more VRAM kept free, one-frame VAE chunks (6-8 GB cards, little system RAM)
#   max-speed   everything on the GPU, torch.compile, FP8 linears (80 GB Hopper-class GPUs)
# A preset only fills variables you have not set yourself, so `FRAMEPACK_X=... bash start.sh max-speed`
# keeps your value. --tiny uses small offline models; every other flag goes to demo_gradio.py
# (`python demo_gradio.py --help`). --dry-run prints the command instead of running it.
set -euo pipefail
cd "$(dirname "$0")"

preset=default
dry_run=0
args=()
if [[ $# -gt 0 && "$1" != -* ]]; then
  preset="$1"; shift
fi
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
      echo
      exec "${PYTHON:-python3}" demo_gradio.py --help ;;
    --preset) preset="${2:?--preset needs a name}"; shift 2 ;;
    --preset=*) preset="${1#--preset=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    *) args+=("$1"); shift ;;
  esac
done

set_default() {  # NAME VALUE: export unless the user already set it
  if [[ -z "${!1+x}" ]]; then export "$1=$2"; fi
  preset_env+=("$1=${!1}")
}
preset_env=()
case "$preset" in
  default) ;;
  low-vram)
    set_default PYTORCH_CUDA_ALLOC_CONF "expandable_segments:True,max_split_size_mb=128"
    set_default FRAMEPACK_USE_MEMORY_V2 1
    set_default FRAMEPACK_GPU_MEMORY_PRESERVATION 8
    set_default FRAMEPACK_VAE_CHUNK_SIZE 1
    ;;
  max-speed)
    set_default FRAMEPACK_KEEP_MODELS_IN_GPU 1
    set_default FRAMEPACK_ENABLE_COMPILE 1
    set_default FRAMEPACK_ENABLE_FP8 1
    set_default FRAMEPACK_XFORMERS_MODE standard
    ;;
  *)
    echo "error: unknown preset '$preset'; choose default, low-vram or max-speed" >&2
    exit 2
    ;;
esac

PYTHON="${PYTHON:-python3}"
cmd=("$PYTHON" demo_gradio.py ${args[@]+"${args[@]}"})
if [[ $dry_run -eq 1 ]]; then
  echo "preset: $preset"
  if [[ ${#preset_env[@]} -gt 0 ]]; then printf '%s\n' "${preset_env[@]}"; fi
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
echo "Starting FramePack (preset: $preset)${preset_env[*]+: ${preset_env[*]}}" >&2
exec "${cmd[@]}"
