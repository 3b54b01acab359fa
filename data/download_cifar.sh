#!/usr/bin/env bash
# Fetch CIFAR-10 (python version) and unpack data/cifar-10-batches-py/.
set -euo pipefail
cd "$(dirname "$0")"
if [ -s cifar-10-batches-py/data_batch_5 ]; then echo "CIFAR-10 is already in $(pwd)/cifar-10-batches-py"; exit 0; fi
url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
echo "fetching $url"
curl -fSL --retry 2 --connect-timeout 15 -o cifar-10-python.tar.gz.part "$url"
mv cifar-10-python.tar.gz.part cifar-10-python.tar.gz
tar -xzf cifar-10-python.tar.gz
rm cifar-10-python.tar.gz
echo "CIFAR-10 is in $(pwd)/cifar-10-batches-py"
