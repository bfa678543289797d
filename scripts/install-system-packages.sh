#!/usr/bin/env bash
# Install the Debian/Ubuntu packages promptcast needs, only those that are missing.
#   run  -> what `make run` needs (Python venv support)
#   test -> also the real servers and tools the tests use
set -euo pipefail
mode="${1:-run}"
pkgs=(python3-venv)
if [ "$mode" = "test" ]; then
  pkgs+=(redis-server nginx libnginx-mod-rtmp ffmpeg chromium chromium-driver)
fi

missing=()
for p in "${pkgs[@]}"; do
  # python3-venv is only needed when this Python cannot make a venv by itself
  if [ "$p" = python3-venv ] && python3 -c 'import ensurepip, venv' 2>/dev/null; then continue; fi
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null; then
  echo "missing system packages: ${missing[*]} (no apt-get here: install them yourself)" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
echo "installing system packages: ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
