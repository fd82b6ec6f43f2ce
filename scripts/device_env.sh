# Sourced by the device scripts: packages the lent machine's image lacks (carried in .whl/), the
# tokenizer vocab (carried in .carry/tiktoken/), and the NCCL settings the machines require.
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
[ -d .carry/tiktoken ] && export TIKTOKEN_ENCODINGS_BASE=$PWD/.carry/tiktoken
export GPT_OSS_CACHE=/tmp/gpt-oss-cache
# Triton's cache in /tmp/tcache (its index files name that folder), filled from an earlier call's
# kernels where one was carried (.carry/tcache.tgz, from `device_throughput.sh cache-out`): a fresh
# machine then loads the kernels whose source is unchanged instead of compiling them (30-40 s of a
# 20b start-up).
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/tcache}
if [ -f .carry/tcache.tgz ] && [ "$TRITON_CACHE_DIR" = /tmp/tcache ]; then
  mkdir -p /tmp/tcache && tar xzf .carry/tcache.tgz -C /tmp/tcache
  echo "Triton cache: $(find /tmp/tcache -name '*.cubin' | wc -l) kernels from .carry/tcache.tgz"
fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
