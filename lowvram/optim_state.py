"""Optimizer state on disk and in memory: safetensors tensors plus a JSON skeleton (never pickled, reloaded bit
for bit), and how many bytes the state holds."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .errors import CheckpointError

STATE_FORMAT = 1


def _tensors_in(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _tensors_in(v)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by every tensor in the optimizer's state (shared tensors, e.g. bnb's code maps, once)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in _tensors_in(list(optimizer.state.values())):
        if t.device.type != "meta":
            key = (str(t.device), t.untyped_storage().data_ptr())
            if key in seen:
                continue
            seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor], seen: dict[int, str]) -> Any:
    """JSON skeleton of a state_dict; tensors go to ``tensors`` under their dotted path."""
    if isinstance(value, torch.Tensor):
        if id(value) in seen:  # one tensor referenced twice (bnb's shared code maps): stored once
            return {"__tensor__": seen[id(value)]}
        seen[id(value)] = path
        # A CPU copy: a snapshot that later steps cannot change, with no storage shared between entries.
        tensors[path] = value.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": path}
    if isinstance(value, dict):
        return {"__dict__": [[k, _encode(v, _join(path, k), tensors, seen)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, _join(path, i), tensors, seen) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, _join(path, i), tensors, seen) for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"optimizer state value at {path} has unsupported type {type(value).__name__}")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        return {k: _decode(v, tensors) for k, v in value["__dict__"]}
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors for safetensors, JSON-able metadata) holding the optimizer's full state_dict.

    Tensors are named by their place in the state dict (``state.<idx>.<name>``, ``param_groups.<i>.<key>``);
    the metadata keeps every non-tensor value (steps as ints, hyper-parameters) and the structure.
    """
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(optimizer.state_dict(), "", tensors, {})
    return tensors, {"format": STATE_FORMAT, "optimizer": type(optimizer).__name__, "state_dict": skeleton}


def optimizer_from_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Load what ``optimizer_to_tensors`` produced into a freshly built optimizer of the same kind."""
    kind = type(optimizer).__name__
    if meta.get("format") != STATE_FORMAT or "state_dict" not in meta:
        raise CheckpointError(
            "the optimizer state in this checkpoint has an unknown format", "start a fresh run"
        )
    if meta.get("optimizer") != kind:
        raise CheckpointError(
            f"the checkpoint's optimizer state is for {meta.get('optimizer')}, this run uses {kind}",
            "resume with the same train.optimizer as the checkpoint",
        )
    try:
        state_dict = _decode(meta["state_dict"], tensors)
    except KeyError as exc:
        raise CheckpointError(
            f"optimizer tensor {exc} is missing from the checkpoint", "the file is damaged"
        ) from exc
    try:
        optimizer.load_state_dict(state_dict)
    except ValueError as exc:
        raise CheckpointError(
            f"optimizer state does not match the model's parameters ({exc})",
            "resume with the same model and LoRA settings as the checkpoint",
        ) from exc
