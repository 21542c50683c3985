"""Cost of the checkpoint's checksum and of the resume fingerprint's weights digest, against torch.save itself.

    python benchmarks/bench_checkpoint_checksum.py [--reps 5]

For PreAct-ResNet18 (CIFAR-10 head) at widths 0.25 and 1.0, on CPU, one thread: the checkpoint's model weights, SGD
momentum state, RNG states and a 100-row history; best of `--reps` wall-clock times of `checkpoint.checksum` (once
per epoch), `identity.weights_digest` (once per run) and `torch.save` into memory (once per epoch).
"""

import argparse
import io
import time

import torch

from ftsam_plugin.data.identity import weights_digest
from ftsam_plugin.defense.checkpoint import checksum, rng_state
from ftsam_plugin.models import create_model


def best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| width | parameters | checksum | weights digest | torch.save (memory) |\n|---|---|---|---|---|")
    for width in (0.25, 1.0):
        model = create_model("preactresnet18", 10, image_size=32, width=width)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        opt.step()  # momentum buffers exist, as in a checkpoint
        state = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                 "optimizer": opt.state_dict(), "rng": rng_state(),
                 "history": [{"epoch": i, "test_acc": 0.5} for i in range(100)]}
        n = sum(p.numel() for p in model.parameters())
        times = [best(fn, args.reps) for fn in (lambda: checksum(state), lambda: weights_digest(model),
                                                   lambda: torch.save(state, io.BytesIO()))]
        print(f"| {width} | {n / 1e6:.2f} M | " + " | ".join(f"{1000 * t:.0f} ms" for t in times) + " |")


if __name__ == "__main__":
    main()
