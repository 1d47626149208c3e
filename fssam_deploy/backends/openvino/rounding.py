"""The memory encoder's bfloat16 rounding, kept exact in f32 OpenVINO models.

The memory encoder rounds the memory features to bfloat16 and back, as the reference stores them in bfloat16
(`MemoryEncoder.bf16_round`); the ONNX graph holds that as Cast(bf16) -> Cast(f32). OpenVINO 2026.4's CPU plugin
compiled this pair, where it follows the last convolution, into something that is not round-to-nearest-even:
on the tiny config 24% of the memory elements came out one bf16 step off (0.0078 at |memory| 1.6), on an
AVX-512 EPYC with the f32 hint (the pair alone, on a parameter, rounds right). `exact_bf16_rounding` replaces
each such pair with Veltkamp's split, the same rounding in f32 arithmetic:

    t = x * (2**16 + 1);  hi = t - (t - x)     # x rounded to 8 significant bits, to nearest, ties to even

which matched torch's `.to(torch.bfloat16)` on all of 2**20 random values (21 ties among them), and left the
memory as close to eager as ONNX Runtime's (0.01-0.02% of the elements one step off, inputs that differ in the
last bit near a rounding boundary). It holds for |x| < 5e33 (x * 65537 must not overflow), and only where the
model runs in f32: under a bf16 precision hint the subtraction would run in bf16 and cancel to zero, so the
runner rewrites models compiled in f32 only.
"""

from __future__ import annotations

import numpy as np

VELTKAMP = np.float32(2.0**16 + 1)  # splits float32's 24 significant bits into 8 (bf16's) and 16


def exact_bf16_rounding(model) -> int:
    """Rewrite every Convert(f32 -> bf16) -> Convert(bf16 -> f32) pair of the `ov.Model` into Veltkamp's split,
    in place; returns how many pairs it rewrote."""
    import openvino as ov
    import openvino.opset13 as ops

    pairs = []
    for down in model.get_ordered_ops():
        if (down.get_type_name() == "Convert" and down.get_output_element_type(0) == ov.Type.bf16
                and down.get_input_element_type(0) == ov.Type.f32):
            ups = [t.get_node() for t in down.output(0).get_target_inputs()]
            if ups and all(u.get_type_name() == "Convert" and u.get_output_element_type(0) == ov.Type.f32
                           for u in ups):
                pairs.append((down, ups))
    for down, ups in pairs:
        x = down.input_value(0)
        t = ops.multiply(x, ops.constant(VELTKAMP))
        rounded = ops.subtract(t, ops.subtract(t, x)).output(0)
        for up in ups:
            for consumer in list(up.output(0).get_target_inputs()):
                consumer.replace_source_output(rounded)
            rounded.get_tensor().add_names(up.output(0).get_names())  # "memory" stays the output's name
    if pairs:
        model.validate_nodes_and_infer_types()
    return len(pairs)
