"""Run the Triton kernels in Triton's CPU interpreter: no GPU is needed to check them.

`triton.jit` reads TRITON_INTERPRET when a kernel is defined, that is when a `triton_*` module is
first imported, so the variable is set here, before any test module of this folder imports one.
With LAYERSWARM_TEST_DEVICE=cuda (`scripts/gpu_check.sh`) the same tests run the compiled
kernels on the GPU instead, bf16 included.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("LAYERSWARM_TEST_DEVICE", "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

_KERNELS = {
    "layerswarm.kernels.triton_ops": "_rms_norm_kernel",
    "layerswarm.kernels.triton_attention": "_prefill_kernel",
    "layerswarm.kernels.triton_quant": "_gemm_kernel",
}
for _module, _kernel in _KERNELS.items():
    if os.environ.get("TRITON_INTERPRET") == "1" and (
        _module in sys.modules
        and type(getattr(sys.modules[_module], _kernel)).__name__ != "InterpretedFunction"
    ):
        raise RuntimeError(
            f"{_module} was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1, "
            "so its kernels need a GPU; import it only inside tests"
        )
