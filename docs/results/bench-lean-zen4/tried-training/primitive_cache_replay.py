"""Do the primitive caches' capacities move a bf16 training step's matmuls? Record them once, replay them per setting.

From the repository root, on the code of 8d0d805:
    python docs/results/bench-lean-zen4/tried-training/primitive_cache_replay.py record
    for c in 16 64 1024; do LRU_CACHE_CAPACITY=$c ONEDNN_PRIMITIVE_CACHE_CAPACITY=64 \
        python docs/results/bench-lean-zen4/tried-training/primitive_cache_replay.py; done
`record` runs two training steps (benchmarks/replay_train_kernels.py) and keeps their matmuls' shapes, strides
and dtypes in /tmp/sigs.pkl; a replay runs them in that order on tensors made once per shape, five passes.
"""

import os
import pickle
import sys
import time

import torch

SIGNATURES = "/tmp/sigs.pkl"


def record() -> None:
    sys.path.insert(0, "benchmarks")
    import replay_train_kernels as replay

    recorders = []
    init = replay.RecordKernels.__init__

    def keep(self):
        init(self)
        recorders.append(self)

    replay.RecordKernels.__init__ = keep
    sys.argv = ["record", "--rounds", "0", "--steps", "2"]
    replay.main()
    calls = [(str(f), a, k) for f, a, k in recorders[0].calls if f in replay.MATMULS]
    with open(SIGNATURES, "wb") as out:
        pickle.dump(calls, out)
    print(len(calls), "matmuls recorded")


def run() -> None:
    with open(SIGNATURES, "rb") as f:
        calls = pickle.load(f)
    ops = {"aten.mm.default": torch.ops.aten.mm.default, "aten.addmm.default": torch.ops.aten.addmm.default}
    made = {}

    def tensor(d):
        if d[0] == "value":
            return d[1]
        if d not in made:
            _, shape, stride, dtype = d
            made[d] = torch.empty_strided(shape, stride, dtype=dtype).normal_(0, 0.5)
        return made[d]

    prepared = [(ops[f], [tensor(d) for d in a], {k: tensor(d) for k, d in kw.items()}) for f, a, kw in calls]
    for f, a, k in prepared:
        f(*a, **k)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for f, a, k in prepared:
            f(*a, **k)
        times.append(time.perf_counter() - t0)
    print(
        os.environ.get("LRU_CACHE_CAPACITY"),
        os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"),
        len(prepared),
        "calls",
        " ".join(f"{t:.3f}" for t in times),
        "min",
        f"{min(times):.3f}",
    )


if __name__ == "__main__":
    record() if sys.argv[1:] == ["record"] else run()
