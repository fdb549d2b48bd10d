#!/bin/bash
# llama.cpp and mixtral decoding a full-size model inside the same memory cgroup (cgroup v1, as root; the limit
# counts the page cache), alternating, each process started cold. Figures in docs/offloading.md (section 5).
#   peers_in_cgroup.sh LLAMA_SCRIPT MODEL.gguf "OURS_MODEL[,OURS_MODEL...]" [LIMIT_GB] [BUDGET] [ROUNDS]
# LLAMA_SCRIPT: a llama-cpp-python script that loads MODEL.gguf with weight repacking off and decodes 6 tokens after
# a 16-token prompt; OURS_MODEL: directories written by `mixtral quantize`.
set -euo pipefail
llama=$1 gguf=$2 ours=$3 limit=${4:-10} budget=${5:-9GB} rounds=${6:-2}
cg=/sys/fs/cgroup/memory/mixtral-peers
mkdir -p $cg && echo $((limit << 30)) > $cg/memory.limit_in_bytes
cold() {  # drop every file's pages from the page cache
    python3 -c 'import os, sys
for p in sys.argv[1:]:
    fd = os.open(p, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)' \
        "$gguf" $(for m in ${ours//,/ }; do echo $m/model.safetensors $m/experts/*.experts; done)
}
for round in $(seq "$rounds"); do
    cold; bash -c "echo \$\$ > $cg/cgroup.procs; exec python3 $llama $gguf 6"
    cold; bash -c "echo \$\$ > $cg/cgroup.procs; exec mixtral bench offload --model $ours --budgets $budget \
        --policies lru,lru+predict --prompt 16 --tokens 6"
done
