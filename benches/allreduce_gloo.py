"""The baseline for `benches/run-allreduce.sh`: torch.distributed all-reduce with gloo on loopback.

Same sizes, iterations and output (one JSON line per size from rank 0, bus bandwidth = size x 2(n-1)/n
divided by the time) as `kiln task allreduce`, so the two are compared on equal terms.
Usage: python allreduce_gloo.py WORLD SIZE_BYTES[,SIZE_BYTES...] ITERATIONS PORT
"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank_main(rank, world, sizes, iterations, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # One thread per rank for the arithmetic, as Kiln's ranks use for reduction on this machine.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for size in sizes:
        buffer = torch.full((size // 4,), float(rank), dtype=torch.float32)
        dist.all_reduce(buffer)  # warm-up
        elapsed = 0.0
        for _ in range(iterations):
            buffer.fill_(float(rank))
            dist.barrier()
            started = time.perf_counter()
            dist.all_reduce(buffer)
            elapsed += time.perf_counter() - started
        seconds = elapsed / iterations
        algorithm = size / seconds / 1e9
        if rank == 0:
            print(json.dumps({
                "bytes": size,
                "world": world,
                "wire": "f32",
                "iterations": iterations,
                "seconds_per_iteration": seconds,
                "algorithm_gbps": algorithm,
                "bus_gbps": algorithm * 2 * (world - 1) / world,
            }), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    world, sizes, iterations, port = int(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")], int(sys.argv[3]), int(sys.argv[4])
    mp.spawn(rank_main, args=(world, sizes, iterations, port), nprocs=world, join=True)
