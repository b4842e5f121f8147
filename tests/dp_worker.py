"""One process of the data-parallel test (tests/test_distributed.py): `expertlib train` on a tiny base.

Run under torchrun: python -m torch.distributed.run --standalone --nproc-per-node 2 dp_worker.py BASE DATA EXPERTS OUT BATCH
or as a plain process (one rank). Every rank trains; rank 0 writes the patch.
"""

from __future__ import annotations

import sys

from expertlib.esft.pipeline import RuntimeConfig, SelectionConfig, train_esft
from expertlib.esft.training import TrainConfig


def main(base: str, data: str, experts: str, out: str, batch: int) -> None:
    config = TrainConfig(lr=3e-3, steps=3, batch_size=batch, grad_accum=2, max_grad_norm=1.0, seed=1)
    train_esft(
        base,
        data,
        task="dp",
        out=out,
        selection=SelectionConfig(experts=experts),
        config=config,
        runtime=RuntimeConfig(device="cpu", progress=False),
    )


if __name__ == "__main__":
    main(*sys.argv[1:5], int(sys.argv[5]))
