"""Tensor parallel on a 2-rank mesh: `up` column-wise, `mid` row-wise, `down` replicated."""

from _sharded import MLP, setup, teardown, train
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)


def main() -> None:
    rank = setup()
    mesh = init_device_mesh("cpu", (2,))
    model = parallelize_module(MLP(), mesh, {"up": ColwiseParallel(), "mid": RowwiseParallel()})
    train(model, rank, per_rank=False)


main()
teardown()
