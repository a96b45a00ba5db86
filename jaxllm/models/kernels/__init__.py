"""Fused attention kernels, one file each; `jaxllm.models.attention` chooses among them and keeps the einsum
path as the reference every kernel is tested against.

    splash.py        JAX's Pallas splash attention (TPU): RoPE families, causal, segments, grouped KV heads
    alibi_flash.py   jaxllm's Pallas flash attention with the ALiBi bias computed in the kernel (TPU)
    sharded.py       the platform being compiled for; a kernel per shard of the mesh (shard_map)
"""
