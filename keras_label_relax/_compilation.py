"""JAX compilation sized to the work it serves."""

import math

# Below this many values in its largest argument, a function is compiled
# without LLVM's optimisations: that halves XLA's compile time (0.2-0.5 s
# per function on 2 cores), which a small problem's few calls never earn
# back, while arrays of millions of values run up to twice as slow that way.
FAST_COMPILE_MAX_VALUES = 2**18


def jax_jit(function):
    """`jax.jit(function)`, compiled for speed of compilation when all of a
    call's arguments are small, for speed of execution otherwise."""
    import jax

    optimised = jax.jit(function)
    fast_to_compile = jax.jit(
        function, compiler_options={"xla_backend_optimization_level": 0}
    )

    def run(*args):
        sizes = [math.prod(leaf.shape) for leaf in _array_leaves(args)]
        if max(sizes, default=0) < FAST_COMPILE_MAX_VALUES:
            return fast_to_compile(*args)
        return optimised(*args)

    return run


def _array_leaves(tree):
    import jax

    return [leaf for leaf in jax.tree_util.tree_leaves(tree) if hasattr(leaf, "shape")]
