#!/usr/bin/env bash
# The operating-system packages a stanceserve build needs: make, python3 with venv (Python >= 3.11), and g++ and
# ninja, which build the CPU decode-attention kernel on the first start (without them the engine logs a warning
# and keeps its slower PyTorch attention).
#
# Run as root on a Debian or Ubuntu system. Each package is installed only when missing, so on a machine that
# has them (a developer's, CI's: .ci/run runs this script) it changes nothing. The Docker image runs it in both
# stages: the CPU base (python:*-slim) lacks make, the CUDA base (nvidia/cuda:*-ubuntu24.04) lacks python3.
#
#   deploy/docker/system-deps.sh [--clean-apt-lists]    (the flag, for images: drop apt's package lists after)
set -euo pipefail

clean=0
for arg in "$@"; do
    case "$arg" in
        --clean-apt-lists) clean=1 ;;
        *) echo "usage: $0 [--clean-apt-lists]" >&2; exit 2 ;;
    esac
done

need=()
command -v make >/dev/null 2>&1 || need+=(make)
if ! command -v python3 >/dev/null 2>&1; then
    need+=(python3 python3-venv)
elif ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    need+=(python3-venv)
fi
command -v update-ca-certificates >/dev/null 2>&1 || need+=(ca-certificates)
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v ninja >/dev/null 2>&1 || need+=(ninja-build)

if [ "${#need[@]}" -eq 0 ]; then
    echo "system-deps: make, python3 (venv), ca-certificates, g++ and ninja are present"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "system-deps: missing ${need[*]}; run this script as root (or install them)" >&2
    exit 1
fi
echo "system-deps: installing ${need[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
if [ "$clean" -eq 1 ]; then
    rm -rf /var/lib/apt/lists/*
fi
