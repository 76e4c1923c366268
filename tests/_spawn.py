"""Results sent from spawned test processes by value. A tensor put on a ``torch.multiprocessing`` queue travels as a
handle to the sender's memory, which the receiver can no longer open once the sender has exited (a race that a
loaded machine loses); bytes made by ``torch.save`` carry the values themselves."""

import io

import torch


def to_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)
