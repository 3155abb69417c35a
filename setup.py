"""The one compiled piece: the merge's fused elementwise step (src/qlora_merge/merging/fused.c).

Optional: where no C compiler is at hand the install goes on without it and merges run the torch sequence, which
gives the same bits. Everything else about the package is in pyproject.toml.
"""

from setuptools import Extension, setup

FUSED = Extension(
    "qlora_merge.merging._fused",
    sources=["src/qlora_merge/merging/fused.c"],
    # IEEE arithmetic exactly as written: no multiply-add contraction, no fast-math; -O3 vectorizes the loops.
    extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off", "-fno-math-errno", "-fvisibility=hidden"],
    optional=True,
)

setup(ext_modules=[FUSED])
