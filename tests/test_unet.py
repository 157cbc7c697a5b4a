"""Tests of the Flax guided-diffusion UNet: configs, parameter names and shapes, numerics, errors.

Parity of whole networks with the PyTorch reference lives in test_parity.py; here
the references are written independently: guided-diffusion's state-dict keys and
torch shapes are enumerated from the config, attention and the timestep
embedding are recomputed in NumPy.
"""

import dataclasses
import itertools
import json
import math

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
from custom_vjp_checks import assert_matches_plain
from flax.traverse_util import flatten_dict, unflatten_dict

from spgd_jax.models import adm as unet
from spgd_jax.models.adm._network import (AttentionBlock, ResBlock, _avgpool2, _SkipConnection,
                                          _torch_kernel_init)
from spgd_jax.convert.adm_names import flax_path, torch_key
from spgd_jax.models.adm import CONFIGS, UNet, UNetConfig

TINY = CONFIGS["tiny16"]


# Independent enumeration of guided-diffusion's state dict --------------------------


def guided_diffusion_state_shapes(cfg: UNetConfig) -> dict[str, tuple[int, ...]]:
    """torch state-dict key -> torch tensor shape, for create_model(**cfg)."""
    shapes: dict[str, tuple[int, ...]] = {}
    mc, emb = cfg.num_channels, 4 * cfg.num_channels

    def param(prefix, weight, bias):
        shapes[prefix + ".weight"], shapes[prefix + ".bias"] = weight, bias

    def conv(prefix, cin, cout, k=3):
        param(prefix, (cout, cin, k, k), (cout,))

    def norm(prefix, c):
        param(prefix, (c,), (c,))

    def res(prefix, cin, cout):
        norm(prefix + ".in_layers.0", cin)
        conv(prefix + ".in_layers.2", cin, cout)
        width = 2 * cout if cfg.use_scale_shift_norm else cout
        param(prefix + ".emb_layers.1", (width, emb), (width,))
        norm(prefix + ".out_layers.0", cout)
        conv(prefix + ".out_layers.3", cout, cout)
        if cin != cout:
            conv(prefix + ".skip_connection", cin, cout, k=1)

    def attn(prefix, c):
        norm(prefix + ".norm", c)
        param(prefix + ".qkv", (3 * c, c, 1), (3 * c,))
        param(prefix + ".proj_out", (c, c, 1), (c,))

    param("time_embed.0", (emb, mc), (emb,))
    param("time_embed.2", (emb, emb), (emb,))
    if cfg.class_cond:
        shapes["label_emb.weight"] = (1000, emb)
    attention_ds = [cfg.image_size // r for r in cfg.attention_resolutions]
    mults = cfg.channel_mult
    ch = int(mults[0] * mc)
    conv("input_blocks.0.0", cfg.in_channels, ch)
    skips, ds, block = [ch], 1, 1
    for level, mult in enumerate(mults):
        for _ in range(cfg.num_res_blocks):
            res(f"input_blocks.{block}.0", ch, int(mult * mc))
            ch = int(mult * mc)
            if ds in attention_ds:
                attn(f"input_blocks.{block}.1", ch)
            skips.append(ch)
            block += 1
        if level < len(mults) - 1:
            if cfg.resblock_updown:
                res(f"input_blocks.{block}.0", ch, ch)
            else:
                conv(f"input_blocks.{block}.0.op", ch, ch)
            skips.append(ch)
            ds, block = 2 * ds, block + 1
    res("middle_block.0", ch, ch)
    attn("middle_block.1", ch)
    res("middle_block.2", ch, ch)
    block = 0
    for level, mult in reversed(list(enumerate(mults))):
        for i in range(cfg.num_res_blocks + 1):
            res(f"output_blocks.{block}.0", ch + skips.pop(), int(mult * mc))
            ch = int(mult * mc)
            layer = 1
            if ds in attention_ds:
                attn(f"output_blocks.{block}.1", ch)
                layer = 2
            if level and i == cfg.num_res_blocks:
                if cfg.resblock_updown:
                    res(f"output_blocks.{block}.{layer}", ch, ch)
                else:
                    conv(f"output_blocks.{block}.{layer}.conv", ch, ch)
                ds //= 2
            block += 1
    norm("out.0", ch)
    conv("out.2", int(mults[0] * mc), cfg.out_channels)
    return shapes


def flax_shape(torch_shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    """The layout change the converter applies (OIHW -> HWIO, (out, in[, 1]) -> (in, out))."""
    if leaf != "kernel":
        return torch_shape
    if len(torch_shape) == 4:
        o, i, kh, kw = torch_shape
        return (kh, kw, i, o)
    return (torch_shape[1], torch_shape[0])


def flat_param_shapes(cfg: UNetConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    return {path: leaf.shape for path, leaf in flatten_dict(unet.init_shapes(cfg)["params"]).items()}


# Random parameters (fresh init has zero output layers, which would hide errors) --------


def random_params(cfg: UNetConfig, seed: int = 0):
    """Every leaf random: kernels N(0, 1/fan_in), biases N(0, 0.1^2), GroupNorm scale 1 + N(0, 0.2^2)."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in sorted(flatten_dict(unet.init_shapes(cfg)["params"]).items()):
        z = rng.standard_normal(leaf.shape).astype(np.float32)
        if path[-1] == "kernel":
            out[path] = z / math.sqrt(math.prod(leaf.shape[:-1]))
        elif path[-1] == "scale":
            out[path] = 1 + 0.2 * z
        elif path[-1] == "embedding":
            out[path] = z
        else:
            out[path] = 0.1 * z
    return unflatten_dict(jax.tree_util.tree_map(jnp.asarray, out))


def inputs(cfg: UNetConfig, batch: int = 2, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg.image_size, cfg.image_size, cfg.in_channels)).astype(np.float32)
    t = rng.uniform(0, 999, batch).astype(np.float32)
    y = rng.integers(0, 1000, batch).astype(np.int32) if cfg.class_cond else None
    return jnp.asarray(x), jnp.asarray(t), None if y is None else jnp.asarray(y)


# Configs and parameter counts -------------------------------------------------------


def test_published_parameter_counts():
    assert unet.param_count(CONFIGS["ffhq256"]) == 93_563_910
    assert unet.param_count(CONFIGS["imagenet256"]) == 552_814_086
    assert len(flat_param_shapes(CONFIGS["ffhq256"])) == 362


@pytest.mark.parametrize("size", [64, 128, 256, 512])
def test_default_channel_mult_follows_create_model(size):
    expected = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
    cfg = UNetConfig(image_size=size, num_channels=128, num_res_blocks=1, attention_resolutions=(16,))
    assert cfg.channel_mult == expected[size]
    assert cfg == dataclasses.replace(cfg, channel_mult=expected[size])


def test_attention_resolutions_are_pixels():
    cfg = UNetConfig(image_size=64, num_channels=64, num_res_blocks=1, attention_resolutions="32,8")
    assert cfg.attention_resolutions == (32, 8)
    assert cfg.attention_downsample == (2, 8)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_round_trips_through_json(name):
    cfg = CONFIGS[name]
    assert UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(num_channels=40), "divisible by 32"),
        (dict(channel_mult=(1, 1.5)), "divisible by 32"),
        (dict(num_head_channels=24), "num_head_channels"),
        (dict(num_head_channels=-1, num_heads=3), "num_heads=3"),
        (dict(num_head_channels=-1, num_heads_upsample=5), "num_heads_upsample=5"),
        (dict(image_size=48, channel_mult=None), "no default channel_mult"),
        (dict(attention_resolutions=(4,)), "attention_resolutions"),
        (dict(image_size=18, channel_mult=(1, 2, 2)), "divisible by 2"),
        (dict(dtype="float16"), "dtype"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(dropout=1.0), "dropout"),
        (dict(channel_mult=()), "channel_mult"),
    ],
)
def test_bad_config_raises_clear_error(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **changes)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown UNetConfig fields"):
        UNetConfig.from_dict({**TINY.to_dict(), "use_fp16": True})


# Parameter naming ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_flax_path_is_a_bijection_onto_the_params_tree(name):
    cfg = CONFIGS[name]
    torch_shapes = guided_diffusion_state_shapes(cfg)
    flax_shapes = flat_param_shapes(cfg)
    mapped = {flax_path(k): flax_shape(s, flax_path(k)[-1]) for k, s in torch_shapes.items()}
    assert len(mapped) == len(torch_shapes)  # injective
    assert mapped == flax_shapes  # onto, and every shape agrees
    assert {torch_key(p) for p in flax_shapes} == set(torch_shapes)
    assert all(torch_key(flax_path(k)) == k for k in torch_shapes)


def test_flax_path_examples():
    assert flax_path("time_embed.0.weight") == ("time_embed_0", "kernel")
    assert flax_path("label_emb.weight") == ("label_emb", "embedding")
    assert flax_path("input_blocks.0.0.bias") == ("input_blocks_0", "0", "bias")
    assert flax_path("input_blocks.1.0.in_layers.0.weight") == ("input_blocks_1", "0", "in_layers_0", "scale")
    assert flax_path("input_blocks.12.1.qkv.weight") == ("input_blocks_12", "1", "qkv", "kernel")
    assert flax_path("middle_block.1.norm.weight") == ("middle_block_1", "norm", "scale")
    assert flax_path("out.0.weight") == ("out_0", "scale")
    assert flax_path("out.2.weight") == ("out_2", "kernel")


@pytest.mark.parametrize("key", ["", "weight", "out.2.running_mean", "out..weight"])
def test_flax_path_rejects_non_parameter_keys(key):
    with pytest.raises(ValueError, match="guided-diffusion parameter key"):
        flax_path(key)


# Shapes for every option combination (traced, not compiled) --------------------------


@pytest.mark.parametrize(
    "scale_shift, updown, new_order, learn_sigma, class_cond",
    list(itertools.product([False, True], repeat=5)),
)
def test_output_shape_for_every_option(scale_shift, updown, new_order, learn_sigma, class_cond):
    cfg = dataclasses.replace(
        TINY,
        use_scale_shift_norm=scale_shift,
        resblock_updown=updown,
        use_new_attention_order=new_order,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        attention_resolutions=(16, 8),
    )
    x, t, y = inputs(cfg, batch=3)
    out, variables = jax.eval_shape(lambda: UNet(cfg).init_with_output(jax.random.key(0), x, t, y))
    assert out.shape == (3, 16, 16, 6 if learn_sigma else 3)
    assert out.dtype == jnp.float32
    assert set(flatten_dict(variables["params"])) == set(map(flax_path, guided_diffusion_state_shapes(cfg)))


# Numerics ------------------------------------------------------------------------


def test_timestep_embedding_matches_numpy():
    t = np.array([0.0, 1.5, 999.0], np.float32)
    dim, half = 64, 32
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)
    expected = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=1)
    np.testing.assert_allclose(unet.timestep_embedding(jnp.asarray(t), dim), expected, atol=2e-4)
    assert unet.timestep_embedding(jnp.asarray(t), 7).shape == (3, 7)


def numpy_attention_block(x, p, heads, new_order):
    """guided-diffusion AttentionBlock on an NHWC array, in float64 and torch's (B, C, T) layout."""
    b, hh, ww, c = x.shape
    flat = x.reshape(b, hh * ww, c).transpose(0, 2, 1).astype(np.float64)  # (B, C, T)
    g = flat.reshape(b, 32, -1)
    normed = (g - g.mean(axis=2, keepdims=True)) / np.sqrt(g.var(axis=2, keepdims=True) + 1e-5)
    normed = normed.reshape(b, c, -1) * p["norm"]["scale"][:, None] + p["norm"]["bias"][:, None]
    qkv = np.einsum("io,bit->bot", p["qkv"]["kernel"], normed) + p["qkv"]["bias"][:, None]
    ch, t = c // heads, hh * ww
    if new_order:
        q, k, v = (z.reshape(b * heads, ch, t) for z in np.split(qkv, 3, axis=1))
    else:
        q, k, v = np.split(qkv.reshape(b * heads, 3 * ch, t), 3, axis=1)
    logits = np.einsum("nct,ncs->nts", q, k) / math.sqrt(ch)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    a = np.einsum("nts,ncs->nct", w, v).reshape(b, c, t)
    h = np.einsum("io,bit->bot", p["proj_out"]["kernel"], a) + p["proj_out"]["bias"][:, None]
    return (flat + h).transpose(0, 2, 1).reshape(b, hh, ww, c)


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_block_head_order_matches_numpy(new_order):
    cfg = dataclasses.replace(TINY, use_new_attention_order=new_order)
    block = AttentionBlock(num_heads=4, config=cfg)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 4, 64)), jnp.float32)
    shapes = jax.eval_shape(block.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(np.float32) * 0.3, shapes)
    out = block.apply({"params": params}, x)
    np_params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    np.testing.assert_allclose(out, numpy_attention_block(np.asarray(x), np_params, 4, new_order), atol=2e-5)
    other = numpy_attention_block(np.asarray(x), np_params, 4, not new_order)
    assert np.abs(np.asarray(out) - other).max() > 1e-2  # the two orders really differ


@pytest.fixture(scope="module")
def tiny_model():
    params = random_params(TINY)
    apply = lambda x, t: UNet(TINY).apply({"params": params}, x, t)  # noqa: E731
    return params, apply


def test_average_pool_values_and_gradient_match_the_plain_pool():
    """The 2x2 average pool's hand-written gradient (an identity product that XLA:CPU does not fuse) is the plain
    one, under vmap too, and stays exact: 2^k values pool and unpool without rounding."""
    def plain(h):
        b, hh, ww, c = h.shape
        return h.reshape(b, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))

    h = jax.random.normal(jax.random.key(0), (2, 8, 6, 5))
    weight = jax.random.normal(jax.random.key(1), (2, 4, 3, 5))
    assert_matches_plain(_avgpool2, plain, (h,), weight)
    assert_matches_plain(jax.vmap(_avgpool2), jax.vmap(plain), (h[:, None],), weight[:, None])
    g = 2.0 ** jax.random.randint(jax.random.key(2), (2, 4, 3, 5), -20, 20)
    _, pullback = jax.vjp(_avgpool2, h)
    np.testing.assert_array_equal(pullback(g)[0], jax.vjp(plain, h)[1](g)[0])


def test_jit_plain_and_vmap_agree(tiny_model):
    _, apply = tiny_model
    x, t, _ = inputs(TINY, batch=2)
    plain = apply(x, t)
    assert plain.shape == (2, 16, 16, 6) and np.abs(np.asarray(plain)).max() > 0.1
    # Other programs (fused, or a batch of one): float32 sums in other orders, which moved outputs by up to
    # 1.3e-6 of their largest |value| (AVX-512, AVX2, no-FMA AVX builds). The floor is 1e-5 of that scale,
    # as for test_parity's max-normalised RTOL (a flat 1e-5 used a quarter of itself): 9x headroom. One
    # image's t off by 0.1 exceeds it 1.6e3x, its x off by 1e-3 relative 86x.
    atol = 1e-5 * np.abs(np.asarray(plain)).max()
    np.testing.assert_allclose(jax.jit(apply)(x, t), plain, atol=atol, rtol=1e-5)
    # Each image is processed independently of the rest of the batch.
    one_by_one = jax.jit(jax.vmap(lambda xi, ti: apply(xi[None], ti[None])[0]))(x, t)
    np.testing.assert_allclose(one_by_one, plain, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("dtype,updown", [("float32", ""), ("bfloat16", ""), ("float32", "up")])
def test_output_block_resblock_takes_its_halves_as_torch_takes_their_concatenation(dtype, updown):
    # An output block's first ResBlock gets (h, skip) unjoined: on the CPU kernels' route (float32) the GroupNorm
    # reads both in place and the 1x1 skip convolution is the sum of one per half; elsewhere they are joined
    # first. Either way it is the ResBlock of their concatenation, with the same parameters (nn.Conv's names,
    # shapes and initial values).
    cfg = dataclasses.replace(TINY, dtype=dtype)
    keys = jax.random.split(jax.random.key(3), 6)
    h, skip = jax.random.normal(keys[0], (2, 8, 8, 64)), 2.0 * jax.random.normal(keys[1], (2, 8, 8, 32))
    h, skip = h.astype(cfg.compute_dtype), skip.astype(cfg.compute_dtype)  # as the UNet computes them
    emb = jax.random.normal(keys[2], (2, 4 * cfg.num_channels))
    block = ResBlock(64, cfg, updown)  # with "up" the halves are joined before the resampling
    params = block.init(keys[3], jnp.concatenate([h, skip], axis=-1), emb, False)
    jax.tree.map(np.testing.assert_array_equal, block.init(keys[3], (h, skip), emb, False), params)
    assert params["params"]["skip_connection"]["kernel"].shape == (1, 1, 96, 64)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(keys[4], p.shape), params)  # no zero layers
    weight = jax.random.normal(keys[5], (2, 16, 16, 64) if updown else (2, 8, 8, 64))

    def loss(h, skip, parts):
        out = block.apply(params, (h, skip) if parts else jnp.concatenate([h, skip], axis=-1), emb, False)
        return jnp.sum(out.astype(jnp.float32) * weight), out

    (_, in_parts), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True), static_argnums=2)(h, skip, True)
    (_, joined), expected = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True), static_argnums=2)(h, skip, False)
    scale = float(jnp.abs(joined.astype(jnp.float32)).max())
    # float32: the skip convolution's sum in two parts moves the output by round-off (1.2e-7 of its scale
    # measured), the gradients not at all (each half's from its own rows of the kernel); bfloat16: one program
    np.testing.assert_allclose(in_parts, joined, rtol=0, atol=(1e-6 if dtype == "float32" else 0) * scale)
    for got, reference in zip(grads, expected):
        np.testing.assert_allclose(got, reference, rtol=0, atol=1e-6 * float(jnp.abs(reference).max()))


def test_skip_connection_of_one_part_is_flax_conv():
    x = jax.random.normal(jax.random.key(4), (2, 8, 8, 96))
    conv = nn.Conv(64, (1, 1), padding=((0, 0), (0, 0)), kernel_init=_torch_kernel_init)
    skip = _SkipConnection(64, jnp.float32)
    params = conv.init(jax.random.key(5), x)
    jax.tree.map(np.testing.assert_array_equal, skip.init(jax.random.key(5), (x,)), params)
    params = jax.tree.map(lambda p: p + 0.1, params)
    np.testing.assert_array_equal(jax.jit(skip.apply)(params, (x,)), jax.jit(conv.apply)(params, x))


def test_bfloat16_compute_is_close_and_params_stay_float32(tiny_model):
    params, apply = tiny_model
    cfg = dataclasses.replace(TINY, dtype="bfloat16")
    x, t, _ = inputs(TINY, batch=2)
    fresh = jax.eval_shape(UNet(cfg).init, jax.random.key(0), x, t)["params"]
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(fresh)} == {jnp.dtype(jnp.float32)}
    out = jax.jit(lambda x, t: UNet(cfg).apply({"params": params}, x, t))(x, t)
    assert out.dtype == jnp.float32
    ref = np.asarray(jax.jit(apply)(x, t))
    err = np.abs(np.asarray(out) - ref).max() / np.abs(ref).max()
    assert 0 < err < 0.05


def test_dropout_only_in_training_with_rng():
    cfg = CONFIGS["tiny16_cond"]
    x, t, y = inputs(cfg, batch=1)
    model = UNet(cfg)
    params = random_params(cfg)

    @jax.jit
    def run(seed):
        rngs = {"dropout": jax.random.key(seed)}
        evaluate = model.apply({"params": params}, x, t, y, rngs=rngs)
        return evaluate, model.apply({"params": params}, x, t, y, train=True, rngs=rngs)

    evaluate, a = run(1)
    evaluate_again, b = run(2)
    np.testing.assert_array_equal(evaluate, evaluate_again)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
    assert np.abs(np.asarray(a) - np.asarray(evaluate)).max() > 1e-3
    with pytest.raises(ValueError, match="'dropout' rng"):
        jax.eval_shape(lambda: model.apply({"params": params}, x, t, y, train=True))


# Input errors ----------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    cond = CONFIGS["tiny16_cond"]
    x, t, y = inputs(cond, batch=2)
    init = lambda cfg, *args: jax.eval_shape(UNet(cfg).init, jax.random.key(0), *args)  # noqa: E731
    with pytest.raises(ValueError, match=r"x must have shape \(B, 16, 16, 3\)"):
        init(cond, x[:, :8], t, y)
    with pytest.raises(ValueError, match="NHWC"):
        init(cond, jnp.moveaxis(x, -1, 1), t, y)
    with pytest.raises(ValueError, match="timesteps must have shape"):
        init(cond, x, t[:1], y)
    with pytest.raises(ValueError, match="class-conditional: pass y"):
        init(cond, x, t, None)
    with pytest.raises(ValueError, match="int labels"):
        init(cond, x, t, y.astype(jnp.float32))
    with pytest.raises(ValueError, match="unconditional"):
        init(TINY, x, t, y)
