#!/usr/bin/env bash
# The main job: build nodekit and run the conformance runner on its embedded lab.
# Extra arguments go to nodekit-conformance (e.g. --reference, --suite cni, --json FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-deps.sh
cargo build --release --workspace --bins
exec target/release/nodekit-conformance "$@"
