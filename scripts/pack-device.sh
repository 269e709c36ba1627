#!/usr/bin/env bash
# Prepares .devnode/ for the GPU machine, which has CUDA but no Node.js and no registry:
# a Node binary and node_modules INCLUDING dev dependencies (vitest and tsx run the GPU
# suite and benchmarks from source there). Trimmed: TypeScript itself (tsx transpiles
# without it) and koffi's prebuilt binaries for other platforms.
#   scripts/pack-device.sh      # after npm ci; then carry .devnode and start with: source .devnode/enter.sh &&
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
mkdir -p .devnode .git/info
grep -qx '/.devnode/' .git/info/exclude 2>/dev/null || echo '/.devnode/' >> .git/info/exclude
if [ ! -f .devnode/node.xz ] || [ "$(command -v node)" -nt .devnode/node.xz ]; then
  xz -T2 -6 -c "$(command -v node)" > .devnode/node.xz
fi
tar -cf - --exclude='node_modules/typescript' --exclude='node_modules/openai' --exclude='node_modules/@types' --exclude='node_modules/.cache' \
  $(find node_modules/koffi/build/koffi -mindepth 1 -maxdepth 1 -type d ! -name linux_x64 -printf '--exclude=%p ') \
  node_modules | xz -T2 -6 > .devnode/modules.tar.xz
cat > .devnode/enter.sh <<'ENTER'
# Sourced at the start of a command on the GPU machine.
_d=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ ! -x /usr/local/bin/node ]; then xz -dc "$_d/node.xz" > /usr/local/bin/node && chmod +x /usr/local/bin/node; fi
if [ ! -d node_modules ]; then tar -xJf "$_d/modules.tar.xz"; fi
export PATH=/usr/local/bin:$PWD/node_modules/.bin:$PATH
node --version >/dev/null || { echo "enter.sh: node did not start" >&2; return 1; }
ENTER
du -sh .devnode/* | sed 's/^/packed: /'
