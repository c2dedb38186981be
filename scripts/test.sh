#!/usr/bin/env bash
# The whole test suite (what CI runs): format and lint gates, unit and integration tests
# (root, network namespaces), then the conformance runner against our plugins.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
target/debug/nodekit-conformance --junit target/conformance-junit.xml --json target/conformance.json
target/debug/nodekit-conformance --suite cri --cri-runtime crun --junit target/conformance-cri-crun-junit.xml
