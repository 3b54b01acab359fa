#!/usr/bin/env bash
# Fetch CIFAR-10 (python version), check the archive against its published MD5, unpack
# data/cifar-10-batches-py/.
set -euo pipefail
cd "$(dirname "$0")"
if [ -s cifar-10-batches-py/data_batch_5 ]; then echo "CIFAR-10 is already in $(pwd)/cifar-10-batches-py"; exit 0; fi
url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
md5="c58f30108f718f92721af3b95e74349a"  # published on https://www.cs.toronto.edu/~kriz/cifar.html
echo "fetching $url"
curl -fSL --retry 2 --connect-timeout 15 -o cifar-10-python.tar.gz.part "$url"
found=$(python3 -c 'import hashlib, sys; print(hashlib.md5(open(sys.argv[1], "rb").read()).hexdigest())' \
        cifar-10-python.tar.gz.part)
if [ "$found" != "$md5" ]; then
    rm -f cifar-10-python.tar.gz.part
    echo "download_cifar.sh: the archive's MD5 is $found, not the published $md5: damaged or not CIFAR-10; nothing unpacked" >&2
    exit 1
fi
mv cifar-10-python.tar.gz.part cifar-10-python.tar.gz
tar -xzf cifar-10-python.tar.gz
rm cifar-10-python.tar.gz
echo "CIFAR-10 is in $(pwd)/cifar-10-batches-py (MD5 checked)"
