"""SmolLM2 split over simulated devices: what each device holds and how far its logits move.

    .venv/bin/python experiments/tensor_parallel.py

Sets 8 simulated CPU devices (before JAX starts), places SmolLM2 with `cj.shard_model` on
tensor-parallel meshes and compares `cj.run` on the IOI prompt with the unsharded run.
Prints the per-device weight bytes, the largest logit difference, the top token and, for
`model=8`, the layout of every weight (the tables in docs/scaling.md).
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402

import circuits_jax as cj  # noqa: E402


def main() -> None:
    model, tok = cj.load("smollm2")
    tokens = tok.to_tokens("When Mary and John went to the store, John gave a drink to")
    ref = np.asarray(cj.run(model, tokens).logits)
    full = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(model) if isinstance(a, jax.Array))
    print(f"weights on one device: {full / 2**20:.1f} MiB")
    for shape in [(1, 1, 3), (1, 1, 8), (1, 2, 4)]:
        mesh = cj.make_mesh(*shape)
        placed = cj.shard_model(model, mesh)
        got = np.asarray(cj.run(placed, tokens).logits)
        print(f"mesh sweep x data x model = {shape}: per-device weights {cj.per_device_bytes(placed) / 2**20:.1f} MiB, "
              f"max |dlogit| {np.abs(got - ref).max():.2g}, top token {tok.decode([int(got[0, -1].argmax())])!r}")  # fmt: skip
        if shape == (1, 1, 8):
            for name, (s, spec) in cj.layout(model, mesh).items():
                print(f"  {name:8s} {str(list(s)):22s} {spec}")


if __name__ == "__main__":
    main()
