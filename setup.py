"""The optional native modules (everything else is in pyproject.toml).

``cndiff._kernels`` fuses the numpy backend's float32 subtraction, max |d| and rounding to
float16/bfloat16 into one pass (F16C/AVX2 where the CPU has it); ``cndiff._pickle_vm``
reads a torch state dict's pickle with the restricted unpickler's rules, about 10x faster.
Both are optional: where they cannot be compiled the install goes on and cndiff uses numpy
and its Python unpickler alone, with the same results.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "cndiff._kernels",
            ["src/cndiff/_kernels.c"],
            # IEEE arithmetic, exactly: no contraction into FMA, no fast-math
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math", "-std=c99"],
            optional=True,
        ),
        # the fast path of the restricted unpickler (cndiff/inputs/unpickle.py)
        Extension(
            "cndiff._pickle_vm",
            ["src/cndiff/_pickle_vm.c"],
            extra_compile_args=["-O2", "-std=c99"],
            optional=True,
        ),
    ]
)
