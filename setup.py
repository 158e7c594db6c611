"""Build the one native piece: the TCP tuning shim preloaded into the relay's srun.

It is an ordinary shared library (never imported by Python), built as an optional extension so
that an install without a C compiler still works, only with a slower srun relay.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "hpc_kernels._srun_tcp_tune",
            sources=["hpc_kernels/_native/srun_tcp_tune.c"],
            optional=True,
        )
    ]
)
