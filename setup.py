"""The optional native kernels (everything else is in pyproject.toml).

``cndiff._kernels`` fuses the numpy backend's float32 subtraction, max |d| and rounding to
float16/bfloat16 into one pass (F16C/AVX2 where the CPU has it). It is optional: where it
cannot be compiled the install goes on and cndiff uses numpy alone, with the same bits.
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
        )
    ]
)
