"""The drafter wire contract in Python: stubs generated from protos/drafter.proto (by
protos/generate.sh) and the conversions between torch tensors and the `Tensor` message."""

from __future__ import annotations

import torch

from services.rpc import drafter_pb2 as pb

PROTOCOL_VERSION = "v1"
# Long prompts carry [tokens, hidden] features: 8k tokens x 4096 x 2 bytes is 64 MiB.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

DTYPES: dict[str, int] = {"float16": pb.DTYPE_FLOAT16, "bfloat16": pb.DTYPE_BFLOAT16, "float32": pb.DTYPE_FLOAT32}
_TORCH = {pb.DTYPE_FLOAT16: torch.float16, pb.DTYPE_BFLOAT16: torch.bfloat16, pb.DTYPE_FLOAT32: torch.float32}


def tensor_to_proto(tensor: torch.Tensor, dtype: str) -> pb.Tensor:
    """Raw little-endian bytes of `tensor` cast to `dtype` ('float16', 'bfloat16' or 'float32')."""
    code = DTYPES[dtype]
    flat = tensor.detach().to("cpu", _TORCH[code]).contiguous()
    raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return pb.Tensor(data=raw, dtype=code, shape=list(flat.shape))


def tensor_from_proto(message: pb.Tensor) -> torch.Tensor:
    """The tensor a `Tensor` message carries; ValueError when its fields disagree."""
    if message.dtype not in _TORCH:
        raise ValueError(f"unsupported tensor dtype {message.dtype}")
    dtype = _TORCH[message.dtype]
    shape = tuple(message.shape)
    count = 1
    for dim in shape:
        if dim < 0:
            raise ValueError(f"negative dimension in shape {shape}")
        count *= dim
    size = torch.empty((), dtype=dtype).element_size()
    if len(message.data) != count * size:
        raise ValueError(f"tensor of shape {shape} needs {count * size} bytes, got {len(message.data)}")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(message.data), dtype=dtype).reshape(shape)
