"""EMA math, weight swapping and the safetensors round trip of lowvram.ema."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowvram.ema import EMA, STEP_KEY
from lowvram.errors import CheckpointError


def _model(value: float = 1.0) -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model


def _set(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_update_follows_the_warmup_decay_exactly():
    model = _model(1.0)
    ema = EMA(model, decay=0.999, device="cpu")
    _set(model, 3.0)
    ema.update(model)  # d = min(0.999, 1/10) = 0.1
    for s in ema.shadow.values():
        torch.testing.assert_close(s, torch.full_like(s, 0.1 * 1.0 + 0.9 * 3.0), rtol=0, atol=1e-6)
    _set(model, 5.0)
    ema.update(model)  # d = 2/11
    expected = 2 / 11 * 2.8 + 9 / 11 * 5.0
    for s in ema.shadow.values():
        torch.testing.assert_close(s, torch.full_like(s, expected), rtol=0, atol=1e-6)
    assert ema.step == 2


def test_decay_caps_at_the_configured_value():
    model = _model()
    ema = EMA(model, decay=0.9)
    for _ in range(200):
        ema.update(model)
    assert ema.current_decay() == 0.9
    assert EMA(model, decay=0.999).current_decay() == pytest.approx(0.1)


def test_shadows_are_fp32_trainable_only_and_on_the_chosen_device():
    model = _model().half()
    model[0].weight.requires_grad_(False)
    ema = EMA(model, decay=0.99, device="cpu")
    assert "0.weight" not in ema.shadow and set(ema.shadow) == {"0.bias", "1.weight", "1.bias"}
    assert all(s.dtype == torch.float32 and s.device.type == "cpu" for s in ema.shadow.values())
    assert len(EMA(model, trainable_only=False).shadow) == 4
    assert ema.num_bytes() == 4 * (4 + 8 + 2)


def test_swapped_loads_ema_weights_and_restores_even_on_error():
    model = _model(1.0)
    ema = EMA(model, decay=0.5)
    _set(model, 9.0)
    ema.update(model)  # shadow 0.1·1 + 0.9·9 = 8.2
    trained = {n: p.clone() for n, p in model.named_parameters()}
    with ema.swapped(model):
        for p in model.parameters():
            torch.testing.assert_close(p, torch.full_like(p, 8.2))
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())
    with pytest.raises(RuntimeError), ema.swapped(model):
        raise RuntimeError("sampling failed")
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())
    ema.copy_to(model)
    assert all(torch.equal(p, ema.shadow[n]) for n, p in model.named_parameters())


def test_state_dict_round_trips_through_safetensors(tmp_path):
    model = _model(1.0)
    ema = EMA(model, decay=0.99)
    for v in (2.0, 3.0, 4.0):
        _set(model, v)
        ema.update(model)
    save_file(ema.state_dict(), str(tmp_path / "ema.safetensors"))
    loaded = load_file(str(tmp_path / "ema.safetensors"))
    assert loaded[STEP_KEY].item() == 3
    other = EMA(_model(0.0), decay=0.99)
    other.load_state_dict(loaded)
    assert other.step == 3 and all(torch.equal(other.shadow[n], s) for n, s in ema.shadow.items())
    # The next update continues identically.
    ema.update(model)
    other.update(model)
    assert all(torch.equal(other.shadow[n], s) for n, s in ema.shadow.items())
    assert set(ema.weights()) == {n for n, _ in model.named_parameters()}


def test_load_state_dict_refuses_another_model():
    ema = EMA(_model())
    with pytest.raises(CheckpointError, match="EMA state"):
        ema.load_state_dict({"other.weight": torch.zeros(1), STEP_KEY: torch.tensor(1)})
