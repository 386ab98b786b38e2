import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from bdjax import models
from bdjax.errors import BdjaxError
from bdjax.models.layers import conv_general_dilated


@pytest.mark.parametrize("name,count", [("preact_resnet18", 11_171_146),
                                        ("vgg19_bn", 139_622_218)])
def test_parameter_counts_match_the_reference(name, count):
    model = models.get(name, num_classes=10)
    state = jax.eval_shape(model.init, jax.random.key(0))
    assert models.count_params(state) == count


@pytest.mark.parametrize("name", models.names())
def test_named_layers_exist(name):
    model = models.get(name)
    params = jax.eval_shape(model.init, jax.random.key(0))["params"]
    for head in model.spec.head:
        assert "kernel" in params[head]
    node = params
    for part in model.spec.last_conv.split("/"):
        node = node[part]
    assert node["kernel"].ndim == 4


def test_small_cnn_forward_and_train_mode():
    model = models.get("small_cnn")
    state = model.init(jax.random.key(0))
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), np.uint8))
    logits = model.apply(state, x)
    assert logits.shape == (4, 10) and logits.dtype == jnp.float32
    logits_t, new_bs = model.apply(state, x, train=True)
    assert logits_t.shape == (4, 10)
    # Train mode updates running statistics; eval mode does not use batch statistics.
    assert not np.allclose(new_bs["bn1"]["mean"], state["batch_stats"]["bn1"]["mean"])
    np.testing.assert_allclose(model.apply(state, x[:1]), logits[:1], rtol=1e-5, atol=1e-5)


def test_uint8_and_unit_float_inputs_agree():
    model = models.get("small_cnn")
    state = model.init(jax.random.key(0))
    x = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), np.uint8)
    np.testing.assert_allclose(model.apply(state, jnp.asarray(x)),
                               model.apply(state, jnp.asarray(x / 255.0, jnp.float32)),
                               rtol=1e-5, atol=1e-5)


def test_bf16_compute_keeps_float32_parameters():
    model = models.get("small_cnn", dtype="bfloat16")
    state = model.init(jax.random.key(0))
    assert state["params"]["conv1"]["kernel"].dtype == jnp.float32
    assert model.apply(state, jnp.zeros((1, 32, 32, 3), jnp.uint8)).dtype == jnp.float32


@pytest.mark.parametrize("h,k,stride,pad", [
    (16, 3, 1, ((1, 1), (1, 1))), (16, 3, 2, ((1, 1), (1, 1))), (15, 3, 2, "SAME"),
    (16, 1, 2, ((0, 0), (0, 0))), (9, 3, 1, "SAME"), (8, 3, 2, "VALID")])
def test_loop_friendly_conv_matches_native_gradients(h, k, stride, pad):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, h, h, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, 4, 6)), jnp.float32)
    dn = ("NHWC", "HWIO", "NHWC")
    native = lambda x, w: lax.conv_general_dilated(x, w, (stride,) * 2, pad, dimension_numbers=dn)
    ours = lambda x, w: conv_general_dilated(x, w, (stride,) * 2, pad, dimension_numbers=dn)
    gy = jnp.asarray(rng.normal(size=native(x, w).shape), jnp.float32)
    ref = jax.grad(lambda x, w: jnp.sum(native(x, w) * gy), (0, 1))(x, w)
    got = jax.grad(lambda x, w: jnp.sum(ours(x, w) * gy), (0, 1))(x, w)
    np.testing.assert_allclose(ours(x, w), native(x, w), rtol=1e-5, atol=1e-5)
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_get_rejects_bad_names():
    with pytest.raises(BdjaxError, match="unknown model 'resnet50'"):
        models.get("resnet50")
    with pytest.raises(BdjaxError, match="num_classes 1"):
        models.get("small_cnn", num_classes=1)


@pytest.mark.parametrize("axes", [(0, 0), (0, None), (None, 0)])
def test_conv_vmapped_over_trials_matches_native(axes):
    """The trial batching rule (fold into batch/channels, or one conv per trial) is exact."""
    rng = np.random.default_rng(1)
    dn = ("NHWC", "HWIO", "NHWC")
    x = jnp.asarray(rng.normal(size=(3, 2, 8, 8, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 4, 5)), jnp.float32)
    xa, wa = (x if axes[0] == 0 else x[0]), (w if axes[1] == 0 else w[0])
    native = lambda x, w: lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=dn)
    ours = lambda x, w: conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=dn)
    gy = jnp.asarray(rng.normal(size=(3, 2, 4, 4, 5)), jnp.float32)
    grads = lambda fn: jax.vmap(lambda a, b, g: jax.grad(
        lambda a, b: jnp.sum(fn(a, b) * g), (0, 1))(a, b), in_axes=(*axes, 0))(xa, wa, gy)
    np.testing.assert_allclose(jax.vmap(ours, in_axes=axes)(xa, wa),
                               jax.vmap(native, in_axes=axes)(xa, wa), rtol=1e-5, atol=1e-4)
    for r, g in zip(grads(native), grads(ours)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def reference_inits():
    """Initial states of the two reference models (VGG19-BN: ~140M draws, a few seconds)."""
    return {name: models.get(name).init(jax.random.key(0))
            for name in ("preact_resnet18", "vgg19_bn")}


def _std_within(values, want, rel=0.03):
    got = float(np.std(np.asarray(values)))
    assert abs(got - want) <= rel * want, (got, want)


def test_preact_resnet18_starts_as_pytorch_default(reference_inits):
    """Conv and linear kernels U(+-1/sqrt(fan_in)) (std bound/sqrt(3)), linear bias the same
    range, BN gamma 1 and beta 0: PyTorch's nn.Conv2d/nn.Linear/nn.BatchNorm2d defaults."""
    state = reference_inits["preact_resnet18"]
    p = state["params"]
    for kernel in (p["conv1"]["kernel"], p["layer2_0"]["conv1"]["kernel"],
                   p["layer3_0"]["shortcut"]["kernel"], p["layer4_1"]["conv2"]["kernel"]):
        kh, kw, cin, _ = kernel.shape
        bound = 1 / np.sqrt(kh * kw * cin)
        assert float(np.abs(kernel).max()) <= bound * (1 + 1e-6)
        assert float(np.abs(kernel).max()) > 0.99 * bound
        _std_within(kernel, bound / np.sqrt(3))
    # layer2_0/conv1: 3x3x64 inputs -> bound 1/24, std 0.024 (flax's LeCun normal: 0.042).
    _std_within(p["layer2_0"]["conv1"]["kernel"], 0.0241, rel=0.02)
    bound = 1 / np.sqrt(512)
    for leaf in (p["linear"]["kernel"], p["linear"]["bias"]):
        assert 0 < float(np.abs(leaf).max()) <= bound * (1 + 1e-6)
    _std_within(p["linear"]["kernel"], bound / np.sqrt(3), rel=0.05)
    np.testing.assert_array_equal(p["layer1_0"]["bn1"]["scale"], 1.0)
    np.testing.assert_array_equal(p["layer1_0"]["bn1"]["bias"], 0.0)


def test_vgg19_bn_starts_as_torchvision(reference_inits):
    """Conv kernels kaiming-normal (fan_out, relu): std sqrt(2 / (9 * out)); linear kernels
    N(0, 0.01); all biases 0; BN gamma 1, beta 0."""
    p = reference_inits["vgg19_bn"]["params"]
    for name in ("conv0", "conv8", "conv15"):
        kernel = p[name]["kernel"]
        _std_within(kernel, np.sqrt(2 / (9 * kernel.shape[-1])))
        assert abs(float(np.mean(kernel))) < 0.05 * float(np.std(kernel))
        np.testing.assert_array_equal(p[name]["bias"], 0.0)
    for name in ("fc0", "fc1", "fc2"):
        _std_within(p[name]["kernel"], 0.01)
        np.testing.assert_array_equal(p[name]["bias"], 0.0)
    np.testing.assert_array_equal(p["bn3"]["scale"], 1.0)
    np.testing.assert_array_equal(p["bn3"]["bias"], 0.0)


def test_preact_logits_at_init_have_the_reference_scale(reference_inits):
    """With PyTorch's init the train-mode logits of random images have std ~0.2 (measured
    0.19; flax's default init gives ~0.55)."""
    model = models.get("preact_resnet18")
    x = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), np.uint8)
    logits, _ = model.apply(reference_inits["preact_resnet18"], jnp.asarray(x), train=True)
    assert 0.1 < float(np.std(np.asarray(logits))) < 0.35
