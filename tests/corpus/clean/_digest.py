"""Exact bit patterns of a run's results, printed by every clean corpus script.

gradtrace must not change a single bit: the test compares this line with and without it.
"""

import hashlib

import torch


def _tensor_hash(tensors: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    state = optimizer.state_dict()["state"]
    return [
        value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        for index in sorted(state)
        for _, value in sorted(state[index].items())
    ]


def digest_line(
    losses: list[float],
    modules: list[torch.nn.Module],
    optimizers: list[torch.optim.Optimizer],
) -> str:
    params = [t for m in modules for t in [*m.state_dict().values()]]
    states = [t for opt in optimizers for t in _optimizer_tensors(opt)]
    return (
        "DIGEST losses="
        + ",".join(float(loss).hex() for loss in losses)
        + f" params={_tensor_hash(params)}"
        + f" optim={_tensor_hash(states)}"
        + f" rng={_tensor_hash([torch.get_rng_state()])}"
    )
