"""neural-tangents 0.6.5 side of the NTK comparison; runs inside the optional environment (see DEVELOPERS.md).

    python benchmarks/nt_peer.py IN.npz OUT.json

IN.npz holds the ReLU network's weights (W0, b0, W1, b1, ...; PyTorch layout: W (out, in)) and inputs x (n, 784).
For each implementation (JACOBIAN_CONTRACTION, NTK_VECTOR_PRODUCTS, STRUCTURED_DERIVATIVES) it times the empirical
NTK traced over the logits on the first n rows for each n in the file's list, and saves the kernel of the largest n
that STRUCTURED_DERIVATIVES did for a value check against neuralpath.
"""

import json
import statistics
import sys
import time

import numpy as np


def main(inp, outp):
    import jax
    import jax.numpy as jnp
    import neural_tangents as nt

    jax.config.update("jax_enable_x64", False)
    z = np.load(inp)
    layers = sorted({int(k[1:]) for k in z.files if k.startswith("W")})
    params = [(jnp.asarray(z[f"W{i}"].T), jnp.asarray(z[f"b{i}"])) for i in layers]
    ns = [int(v) for v in z["ns"]]
    x_all = jnp.asarray(z["x"])

    n_conv = int(z["n_conv"]) if "n_conv" in z.files else 0
    if n_conv:  # conv layers keep PyTorch's OIHW layout
        params = [
            (jnp.asarray(z[f"W{i}"]), jnp.asarray(z[f"b{i}"]))
            if i < n_conv
            else (jnp.asarray(z[f"W{i}"].T), jnp.asarray(z[f"b{i}"]))
            for i in layers
        ]

    def f(p, x):
        h = x
        if n_conv:  # 3x3 'same' convolutions, ReLU, then global average pooling (GCONV)
            for w, b in p[:n_conv]:
                h = jax.lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
                h = jax.nn.relu(h + b[None, :, None, None])
            h = h.mean(axis=(2, 3))
        for w, b in p[n_conv:-1]:
            h = jax.nn.relu(h @ w + b)
        w, b = p[-1]
        return h @ w + b

    recs = []
    impls = {
        "STRUCTURED_DERIVATIVES": nt.NtkImplementation.STRUCTURED_DERIVATIVES,
        "NTK_VECTOR_PRODUCTS": nt.NtkImplementation.NTK_VECTOR_PRODUCTS,
        "JACOBIAN_CONTRACTION": nt.NtkImplementation.JACOBIAN_CONTRACTION,
    }
    if "impls" in z.files:  # the caller may leave out an implementation too slow at its n
        impls = {k: v for k, v in impls.items() if k in {str(i) for i in z["impls"]}}
    saved = None
    for name, impl in impls.items():
        fn = jax.jit(nt.empirical_ntk_fn(f, trace_axes=(-1,), vmap_axes=0, implementation=impl))
        for n in ns:
            x = x_all[:n]
            try:
                k = fn(x, None, params).block_until_ready()  # compile + first run
                ts = []
                for _ in range(3):
                    t = time.perf_counter()
                    k = fn(x, None, params).block_until_ready()
                    ts.append(time.perf_counter() - t)
                recs.append({"impl": name, "n": n, "seconds": statistics.median(ts)})
                if name == "STRUCTURED_DERIVATIVES":
                    saved = (n, np.asarray(k))
            except Exception as e:  # out of memory or unsupported: record and go on
                recs.append({"impl": name, "n": n, "error": str(e).splitlines()[0][:200]})
                break
            print(json.dumps(recs[-1]), file=sys.stderr, flush=True)
            if recs[-1]["seconds"] > 20:  # the next n (twice as many inputs) would take minutes
                break
    if saved is not None:
        np.save(outp + ".kernel.npy", saved[1])
    with open(outp, "w") as fh:
        json.dump(
            {
                "records": recs,
                "kernel_n": None if saved is None else saved[0],
                "jax": jax.__version__,
                "neural_tangents": nt.__version__,
            },
            fh,
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
