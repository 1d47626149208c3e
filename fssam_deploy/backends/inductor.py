"""The Inductor settings of every compiled path: AOTInductor packages and torch.compile'd stages.

Inductor drops a cast to a narrower float and back when it fuses both into one kernel (its default,
`emulate_precision_casts=False`). The memory encoder rounds the memory features to bfloat16 and back, as the
reference stores them in bfloat16 (`MemoryEncoder.bf16_round`); compiled, that rounding vanished, and the
memory differed from eager by up to one bf16 ulp (4e-3 at |memory| 1.6; tiny config, AOTInductor on the CPU,
`tests/backends/aoti/test_aoti.py::test_stage_parity`). With the casts emulated it matches eager to 1e-5.
"""

from __future__ import annotations

FAITHFUL = {"emulate_precision_casts": True}
