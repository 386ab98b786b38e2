"""Where bdjax is slower than PyTorch on a CPU, and how its trials scale there.

    PYTHONPATH=$PWD python benchmarks/cpu_gap.py      # ~3 minutes on 2 cores; needs torch

Prints, side by side in one process:
1. for FT-SAM, Grad-Prune, NPD and FT (bench --quick settings: 256 images, 1 epoch), the
   run time of 1 trial, 5 vmapped trials and 5 trials in sequence through the same
   compiled one-trial program (experiment.run_defense strategy="sequential");
2. a 1024x1024 matrix product in XLA and in PyTorch (GFLOP/s);
3. one 3x3 convolution (64 -> 64 channels, 64 images of 32x32) forward + backward outside
   any loop: XLA's native gradient, bdjax's loop-friendly custom VJP, and PyTorch.
"""

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import torch

from bdjax import bench, defenses, experiment

d = bench.bench_data(256, 32)
model = bench._model("small_cnn")
state = model.init(jax.random.key(0))
for name in ("ft_sam", "grad_prune", "npd", "ft"):
    dfn = defenses.get(name, **bench._SHORT[name])
    out = {}
    for T, strat in ((1, "vmap"), (5, "vmap"), (5, "sequential")):
        split = bench._split(d, T)
        if dfn.needs_trigger: split = dataclasses.replace(split, trigger=d["attack"])
        keys = jnp.stack([jax.random.key(t) for t in range(T)])
        experiment.run_defense(model, state, dfn, split, keys, strategy=strat)
        ts = [experiment.run_defense(model, state, dfn, split, keys, strategy=strat).seconds_run for _ in range(3)]
        out[(T, strat)] = statistics.median(ts)
    print(name, {f"T{k[0]}-{k[1]}": round(v, 3) for k, v in out.items()}, "vmap5/1 %.2f seq5/1 %.2f" % (out[(5,'vmap')]/out[(1,'vmap')], out[(5,'sequential')]/out[(1,'vmap')]), flush=True)
# matmul: XLA vs torch
n = 1024
a = jnp.ones((n, n)); f = jax.jit(lambda a: a @ a); f(a).block_until_ready()
t = time.perf_counter(); [f(a).block_until_ready() for _ in range(10)]; tx = (time.perf_counter() - t) / 10
ta_ = torch.ones(n, n); torch.mm(ta_, ta_)
t = time.perf_counter(); [torch.mm(ta_, ta_) for _ in range(10)]; tt = (time.perf_counter() - t) / 10
print("matmul 1024: XLA %.1f GFLOP/s, torch %.1f GFLOP/s" % (2*n**3/tx/1e9, 2*n**3/tt/1e9))
# conv fwd+bwd outside loop, native XLA vs torch (64 images of 32x32x64 -> 64 3x3)
x = jax.random.normal(jax.random.key(0), (64, 32, 32, 64)); w = jax.random.normal(jax.random.key(1), (3, 3, 64, 64))
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
g = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))
jax.block_until_ready(g(x, w)); t = time.perf_counter(); [jax.block_until_ready(g(x, w)) for _ in range(5)]; cx = (time.perf_counter() - t) / 5
from bdjax.models.layers import conv_general_dilated as ours
g2 = jax.jit(jax.grad(lambda x, w: jnp.sum(ours(x, w, (1, 1), "SAME") ** 2), argnums=(0, 1)))
jax.block_until_ready(g2(x, w)); t = time.perf_counter(); [jax.block_until_ready(g2(x, w)) for _ in range(5)]; co = (time.perf_counter() - t) / 5
xt = torch.randn(64, 64, 32, 32, requires_grad=True); wt = torch.randn(64, 64, 3, 3, requires_grad=True)
def tc():
    y = torch.nn.functional.conv2d(xt, wt, padding=1); (y ** 2).sum().backward()
tc(); t = time.perf_counter(); [tc() for _ in range(5)]; ct = (time.perf_counter() - t) / 5
print("conv 3x3 64->64, 64x32x32, fwd+bwd: XLA native %.1f ms, bdjax custom VJP %.1f ms, torch %.1f ms" % (cx*1e3, co*1e3, ct*1e3))
