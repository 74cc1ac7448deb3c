"""Which tensors of a torch module travel: its state dict less its frozen parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedpriv.wire.torch_interop import exchanged_state


def frozen_base() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    for parameter in model[0].parameters():
        parameter.requires_grad_(False)
    return model


def test_trainable_leaves_out_frozen_parameters_and_keeps_buffers():
    model = frozen_base()
    assert sorted(exchanged_state(model)) == [
        "1.bias",
        "1.num_batches_tracked",
        "1.running_mean",
        "1.running_var",
        "1.weight",
        "2.bias",
        "2.weight",
    ]
    assert sorted(exchanged_state(model, "all")) == sorted(model.state_dict())


def test_the_tensors_are_the_modules_own_not_copies():
    model = frozen_base()
    state = exchanged_state(model)
    with torch.no_grad():
        state["2.bias"].fill_(7.0)
    assert torch.all(model[2].bias == 7.0)


def test_tied_weights_are_frozen_under_both_names():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight  # one tensor, two names
            self.adapter = nn.Linear(4, 4)

    model = Tied()
    model.embed.weight.requires_grad_(False)
    assert sorted(exchanged_state(model)) == ["adapter.bias", "adapter.weight"]


def test_a_model_with_nothing_to_exchange_or_an_unknown_mode_is_refused():
    model = nn.Linear(3, 3)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to exchange"):
        exchanged_state(model)
    with pytest.raises(ValueError, match="exchange = 'some': expected one of 'trainable', 'all'"):
        exchanged_state(nn.Linear(3, 3), "some")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_module_becomes_views_of_one_buffer_laid_out_as_the_wire(dtype):
    from fedpriv.wire import arrays_from_payload
    from fedpriv.wire.torch_interop import layout_for_state_dict, views_of_one_buffer

    model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 2)).to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = exchanged_state(model)
    layout = layout_for_state_dict(state, chunk_bytes=64)
    flat = views_of_one_buffer(model, state, layout)
    assert flat is not None and flat.nbytes == layout.payload_bytes
    start, end = flat.ctypes.data, flat.ctypes.data + flat.nbytes
    for name, tensor in model.state_dict().items():
        assert start <= tensor.data_ptr() < end and tensor.dtype == dtype
        assert torch.equal(tensor, before[name])
    # the buffer decodes to the module's weights, and bytes written into it are them
    decoded = arrays_from_payload(layout, flat)
    assert set(decoded) == set(before)
    flat[:] = 0
    assert not any(t.any() for t in model.state_dict().values())
    # a layout of other shapes leaves the module alone
    other = layout_for_state_dict({"0.weight": torch.zeros(3, 3, dtype=dtype)}, chunk_bytes=64)
    assert views_of_one_buffer(nn.Linear(3, 3).to(dtype), {"weight": torch.zeros(3)}, other) is None
