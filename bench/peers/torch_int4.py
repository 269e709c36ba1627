#!/usr/bin/env python3
"""torch's int4 weight-only GEMM and bf16 matmul on Llama-2-7B decode shapes: the peers of
bench/quant_gemm.ts (issue 4's speed lines).

  int4  torch._weight_int4pack_mm (tinygemm: 4-bit, group 128, bf16 scales and zeros),
        weights packed by torch.ops.aten._convert_weight_to_int4pack (inner_k_tiles 8)
  bf16  torch.matmul of x [M, K] by W^T (cuBLAS)

Timed like bench/quant_gemm.ts: device time per call from CUDA-graph replays of `reps`
back-to-back calls, the weights rotated over enough copies to exceed the L2 cache twice (a
decode step streams each weight from HBM once). Prints one JSON object. GPU machine only
(python3 with torch and CUDA); run it in the same command as the TypeScript bench:

  python3 bench/peers/torch_int4.py [--rows 1,8,32] [--reps 20] [--iters 20]
"""

import argparse
import json
import math

import torch

GROUP = 128
INNER_K_TILES = 8
SHAPES = [
    ("up K4096 N11008", 4096, 11008),
    ("qkv K4096 N12288", 4096, 12288),
    ("o K4096 N4096", 4096, 4096),
    ("gate_up K4096 N22016", 4096, 22016),
    ("down K11008 N4096", 11008, 4096),
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,8,32")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--iters", type=int, default=20)
    return p.parse_args()


def l2_bytes() -> int:
    props = torch.cuda.get_device_properties(0)
    return int(getattr(props, "L2_cache_size", 50 * 2**20))


def copies_past_l2(nbytes: int) -> int:
    """As bench/graph_timing.ts copiesPastL2: together at least twice the L2 cache."""
    return max(2, math.ceil(2 * l2_bytes() / nbytes))


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes int32 [N, K] in 0..15 -> tinygemm's packed weight. torch >= 2.5 takes uint8
    [N, K/2] (two codes per byte, the even k in the high nibble); older releases int32 [N, K]."""
    packed_u8 = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
    try:
        return torch.ops.aten._convert_weight_to_int4pack(packed_u8, INNER_K_TILES)
    except RuntimeError:
        return torch.ops.aten._convert_weight_to_int4pack(codes.contiguous(), INNER_K_TILES)


def int4_weight(K: int, N: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    codes = torch.randint(0, 16, (N, K), dtype=torch.int32, device="cuda", generator=g)
    # tinygemm's scales_and_zeros [K/group, N, 2]: (scale, zero) with w = (q - 8) * scale + zero.
    sz = torch.empty(K // GROUP, N, 2, dtype=torch.bfloat16, device="cuda")
    sz[..., 0] = 0.01
    sz[..., 1] = 0.0
    return pack_int4(codes), sz


def time_graph(body, reps: int, iters: int) -> float:
    """Microseconds per call of body(i), i = 0..reps-1, captured in one graph and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(reps):  # warm-up outside the capture (workspaces, lazy init)
            body(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            body(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (iters * reps)


def main() -> None:
    args = parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    out = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "l2_bytes": l2_bytes(),
        "reps": args.reps,
        "iters": args.iters,
        "group_size": GROUP,
        "inner_k_tiles": INNER_K_TILES,
        "gemm": [],
    }
    for name, K, N in SHAPES:
        dense = [torch.randn(N, K, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies_past_l2(N * K * 2))]
        quant = [int4_weight(K, N, 100 + i) for i in range(copies_past_l2(N * K // 2 + (K // GROUP) * N * 4))]
        for M in rows:
            x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
            bf16_us = time_graph(lambda i: torch.matmul(x, dense[i % len(dense)].t()), args.reps, args.iters)
            int4_us = time_graph(
                lambda i: torch._weight_int4pack_mm(x, quant[i % len(quant)][0], GROUP, quant[i % len(quant)][1]),
                args.reps, args.iters)
            out["gemm"].append({
                "op": name, "M": M, "K": K, "N": N,
                "torch_int4_us": round(int4_us, 2), "cublas_bf16_us": round(bf16_us, 2),
                "int4_vs_bf16": round(int4_us / bf16_us, 3),
            })
        del dense, quant
        torch.cuda.empty_cache()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
