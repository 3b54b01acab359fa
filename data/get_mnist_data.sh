#!/usr/bin/env bash
# Fetch the four MNIST files into data/mnist_data/ and unpack them.
# Works from any folder; tries several mirrors because the original host is often down.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p mnist_data
cd mnist_data
MIRRORS=(
  "https://ossci-datasets.s3.amazonaws.com/mnist"
  "https://storage.googleapis.com/cvdf-datasets/mnist"
  "http://yann.lecun.com/exdb/mnist"
)
for name in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  if [ -s "$name" ]; then echo "$name: already here"; continue; fi
  if [ -s "$name.gz" ] && gzip -t "$name.gz" 2>/dev/null; then gunzip -kf "$name.gz"; echo "$name: unpacked"; continue; fi
  ok=0
  for mirror in "${MIRRORS[@]}"; do
    echo "fetching $name.gz from $mirror"
    if curl -fsSL --retry 2 --connect-timeout 15 -o "$name.gz.part" "$mirror/$name.gz" \
       && gzip -t "$name.gz.part" 2>/dev/null; then
      mv "$name.gz.part" "$name.gz"; ok=1; break
    fi
    rm -f "$name.gz.part"
  done
  if [ "$ok" != 1 ]; then echo "could not fetch $name.gz from any mirror" >&2; exit 1; fi
  gunzip -kf "$name.gz"
done
echo "MNIST is in $(pwd)"
