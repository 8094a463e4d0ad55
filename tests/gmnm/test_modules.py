import pytest
import torch
from torch import nn

from gmnm import GMNMActivation, GMNMConfig, GMNMLayer, GMNMSoftmax
from gmnm import functional as GF


@pytest.mark.parametrize(
    "base",
    [nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU(), nn.SiLU(), nn.ReLU(inplace=True)],
)
def test_residual_init_equals_base_module(base: nn.Module) -> None:
    x = torch.randn(8, 33) * 4
    expected = base(x.clone())
    assert torch.equal(GMNMActivation(8, base=base)(x), expected)


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "relu", "silu"])
def test_residual_init_equals_named_base(name: str) -> None:
    x = torch.randn(8, 33) * 4
    assert torch.equal(GMNMActivation(8, base=name)(x), GF.BASE_FUNCTIONS[name](x))


@pytest.mark.parametrize("name", ["gelu", "silu"])
def test_fit_init_is_within_a_hundredth_on_its_range(name: str) -> None:
    module = GMNMActivation(8, base=name, init="fit")
    x = torch.linspace(-3, 3, 20001)
    error = (module(x) - GF.BASE_FUNCTIONS[name](x)).abs().max().item()
    assert error < 0.01
    assert module.fit_max_error is not None and module.fit_max_error < 0.01


def test_groups_that_do_not_divide_channels_are_refused_with_the_valid_choices() -> None:
    with pytest.raises(ValueError, match="does not divide channels=10"):
        GMNMActivation(4, channels=10, groups=3)
    with pytest.raises(ValueError, match="needs channels"):
        GMNMActivation(4, groups=2)


def test_config_round_trips_through_a_dict() -> None:
    config = GMNMConfig(num_components=4, base="silu", init="fit", channels=8, groups=2)
    assert GMNMConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown GMNMConfig field"):
        GMNMConfig.from_dict({"num_components": 4, "components": 4})


def test_softmax_equals_torch_softmax_at_init() -> None:
    scores = torch.randn(2, 4, 7, 7) * 5
    assert torch.equal(GMNMSoftmax(heads=4)(scores), torch.softmax(scores, dim=-1))


def test_softmax_keeps_masks_and_zeroes_fully_masked_rows() -> None:
    module = GMNMSoftmax(heads=2)
    with torch.no_grad():
        module.pi.normal_()
    scores = torch.randn(1, 2, 3, 4) * 200
    scores[..., 1] = float("-inf")
    scores[0, 0, 0] = float("-inf")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        probs = module(scores.to(dtype))
        assert probs.dtype == dtype
        assert not probs.isnan().any()
        assert torch.all(probs[..., 1] == 0)
        assert torch.all(probs[0, 0, 0] == 0)


def test_gmnm_layer_fits_a_2d_function() -> None:
    torch.manual_seed(0)
    xy = (torch.rand(2048, 2) * 2 - 1) * torch.pi
    target = (torch.sin(xy[:, 0]) * torch.cos(xy[:, 1])).unsqueeze(1)
    model = GMNMLayer(2, 1, num_components=64, num_projections=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    initial = nn.functional.mse_loss(model(xy), target).item()
    for _ in range(1500):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(xy), target)
        loss.backward()
        optimizer.step()
    assert loss.item() < initial / 100
