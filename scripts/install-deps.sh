#!/usr/bin/env bash
# Installs what nodekit's main job, tests and benchmarks use on Debian 12, as root.
# Idempotent: skips apt when everything is already there.
set -euo pipefail

packages=(containernetworking-plugins iproute2 nftables iputils-ping etcd-server protobuf-compiler e2fsprogs xfsprogs runc crun containerd docker-registry busybox-static openssl)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null || {
    echo "cargo is missing: install a Rust toolchain (rustup, Rust >= 1.85)" >&2
    exit 1
}
[ "$(id -u)" = 0 ] || { echo "run as root: the lab creates network namespaces" >&2; exit 1; }
