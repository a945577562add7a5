"""One rank of the 2-process gloo check of tests/test_extra_data.py: each rank iterates its shard of
a MixedBatches epoch (base split + memory-mapped extra .npz) and the shards are all-gathered.

Run as ``python tests/_extra_dist_worker.py OUT_DIR`` (RANK, WORLD_SIZE, MASTER_* set; the .npz at
OUT_DIR/extra.npz); writes ``OUT_DIR/rank{r}.json`` with the gathered batches' digests."""
import hashlib
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _dist_launch import worker_main  # noqa: E402
from awpfast.data import Split  # noqa: E402
from awpfast.extra_data import MixedBatches, open_extra  # noqa: E402

def base_split():
    g = torch.Generator().manual_seed(3)
    return Split(torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g),
                 torch.randint(0, 5, (40,), generator=g))


def digest(x, y):
    return hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()


def checks(out):
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    def union(res):
        ex = open_extra(os.path.join(out, "extra.npz"), 10, 32)
        mb = MixedBatches(base_split(), ex, 10, 0.7, augment="crop+flip", seed=5, rank=rank, world_size=world)
        res["digests"] = []
        for x, y in mb:
            xs = [torch.empty_like(x) for _ in range(world)]
            ys = [torch.empty_like(y) for _ in range(world)]
            dist.all_gather(xs, x)
            dist.all_gather(ys, y)
            # positions r, r + WORLD, ... of the global batch: interleave the shards back
            res["digests"].append(digest(torch.stack(xs, 1).flatten(0, 1), torch.stack(ys, 1).flatten(0, 1)))
        res["local_rows"] = int(x.shape[0])

    return [("union", union)]


if __name__ == "__main__":
    worker_main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), checks)
