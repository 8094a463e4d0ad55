import pytest
import torch
from torch import nn

import gmnm
from gmnm import GMNMActivation, GMNMConfig, GMNMLayer, GMNMSoftmax
from gmnm import functional as GF

RESIDUAL_MODULES = [
    nn.GELU(),
    nn.GELU(approximate="tanh"),
    nn.ReLU(),
    nn.SiLU(),
    nn.ReLU(inplace=True),
    nn.Tanh(),
]


@pytest.mark.parametrize("backend", ["auto", "cpp", "recompute"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base", RESIDUAL_MODULES, ids=repr)
def test_residual_init_equals_base_module(
    base: nn.Module, dtype: torch.dtype, backend: str
) -> None:
    gmnm.set_backend(backend)
    # odd sizes and more than one chunk of the CPU kernel
    x = (torch.randn(9, 40_001) * 4).to(dtype)
    expected = base(x.clone())
    assert torch.equal(GMNMActivation(8, base=base)(x), expected)


@pytest.mark.parametrize("backend", ["auto", "cpp", "recompute"])
@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "relu", "silu", "identity", "sigmoid"])
def test_residual_init_equals_named_base(name: str, backend: str) -> None:
    gmnm.set_backend(backend)
    x = torch.randn(8, 33, 5) * 4
    module = GMNMActivation(8, base=name, channels=5, groups=5)
    assert torch.equal(module(x), GF.BASE_FUNCTIONS[name](x))


def test_residual_init_stays_exact_after_calibration() -> None:
    x = torch.randn(64, 12) * 3
    module = GMNMActivation(8, base=nn.GELU(), channels=12, groups=12)
    module.calibrate(x)
    assert torch.equal(module(x), nn.functional.gelu(x))


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


@pytest.mark.parametrize("backend", ["auto", "cpp", "compile", "recompute", "reference"])
@pytest.mark.parametrize("groups", [1, 3, 12])
def test_an_input_of_another_width_than_channels_is_refused(backend: str, groups: int) -> None:
    gmnm.set_backend(backend)
    module = GMNMActivation(4, base="gelu", channels=12, groups=groups, init="random")
    assert module(torch.randn(2, 12)).shape == (2, 12)
    for width in (24, 6, 13):
        with pytest.raises(ValueError, match=f"channels=12 .* the input has {width} .*channels="):
            module(torch.randn(2, width))
    with pytest.raises(ValueError, match="the input has 24"):
        module.calibrate(torch.randn(2, 24))


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
    for _ in range(400):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(xy), target)
        loss.backward()
        optimizer.step()
    assert loss.item() < initial / 100


def test_softmax_is_stable_for_logits_in_the_hundreds() -> None:
    module = GMNMSoftmax(heads=3)
    with torch.no_grad():
        module.pi.normal_()
    scores = torch.randn(2, 3, 5, 9) * 300 + 500
    probs = module(scores)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 5))


def test_softmax_per_head_parameters_all_receive_gradients() -> None:
    module = GMNMSoftmax(heads=4, head_dim=1)
    scores = torch.randn(2, 4, 6, 6, requires_grad=True)
    target = torch.softmax(torch.randn(2, 4, 6, 6), dim=-1)
    (module(scores) - target).square().sum().backward()
    for name in ("pi", "mu", "rho"):
        grad = getattr(module, name).grad
        assert grad is not None and grad.shape == (4, 8)
    # pi starts at zero, so its gradient is the one that must reach every head
    assert bool((module.pi.grad.abs().sum(1) > 0).all())
    assert scores.grad is not None and torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_casting_a_model_to_half_keeps_gmnm_parameters_in_fp32(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 16),
        GMNMActivation(8, base="gelu", init="fit"),
        GMNMActivation(4, base=nn.SiLU(), channels=16, groups=4, init="random"),
    )
    softmax = GMNMSoftmax(heads=2)
    x = torch.randn(4, 16)
    reference = model(x)
    model(x).sum().backward()

    model.to(dtype)
    softmax.to(dtype)
    assert model[0].weight.dtype == dtype
    for module in (model[1], model[2], softmax):
        for name, param in module.named_parameters():
            assert param.dtype == torch.float32, name
            assert param.grad is None or param.grad.dtype == torch.float32, name

    out = model(x.to(dtype))
    assert out.dtype == dtype
    # the half Linear is the only source of error: fp32 mixture weights keep the fit intact
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert model[1].pi.grad is not None and model[1].pi.grad.dtype == torch.float32


def test_casting_to_float64_is_followed() -> None:
    module = GMNMActivation(4, base="linear").double()
    assert {p.dtype for p in module.parameters()} == {torch.float64}
