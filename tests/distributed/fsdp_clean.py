"""FSDP2: each Linear and the root `fully_shard`ed, AdamW, 5 steps; no findings."""

from _sharded import MLP, setup, teardown, train
from torch.distributed.fsdp import fully_shard


def main() -> None:
    rank = setup()
    model = MLP()
    for layer in (model.up, model.mid, model.down):
        fully_shard(layer)
    fully_shard(model)
    train(model, rank, per_rank=True)


main()
teardown()
