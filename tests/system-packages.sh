#!/usr/bin/env bash
# Debian packages some integration tests need, installed by `make test` when they are missing:
#   iproute2  `ip netns` + veth: the second host of tests/integration/test_second_host.py
#   chromium  headless browser for tests/integration/test_flower_ui.py
# Idempotent: does nothing when all are there. Needs root and apt-get; without them it says so
# and leaves the install to the user (those tests then skip, printing why).
set -euo pipefail

PACKAGES=(iproute2 chromium)

missing=()
for package in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "system-packages: missing ${missing[*]}; not root or no apt-get, so not installing them" \
         "(the tests that need them will skip). Install with: sudo apt-get install ${missing[*]}" >&2
    exit 0
fi

echo "system-packages: installing ${missing[*]} (apt-get) for the integration tests"
export DEBIAN_FRONTEND=noninteractive
# One installer at a time: several worktrees may run `make test` at once.
exec 9>/var/lock/koubou-system-packages.lock
flock -w 900 9
timeout 300 apt-get update -qq -o DPkg::Lock::Timeout=600
timeout 900 apt-get install -y -qq -o DPkg::Lock::Timeout=600 --no-install-recommends "${missing[@]}"
