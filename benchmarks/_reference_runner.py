"""Run the FSSAM reference (GitHub Sam1224/FSSAM) on the CPU, in fp32, for parity checks.

Not part of the package: `reference_parity.py` starts it in a subprocess, because the
reference ships its own modified `sam2` package that would shadow the one from PyPI.
It imports the reference from the checkout you name; nothing of it is copied here.

Runtime patches the released code needs on a CPU machine:
- `Tensor.cuda` is a no-op and `Module.to("cuda")` stays on the CPU (the reference
  calls both unconditionally);
- `RoPEAttention.Weighted_GAP` is bound to `model.FSSAM.Weighted_GAP` (called, never defined);
- DINOv2 is built from a local checkout of facebookresearch/dinov2 instead of torch hub;
- `add_new_mask_batch` returns its bf16 memory features converted back to fp32: on a GPU
  the reference runs under bf16 autocast, but on the CPU the bf16 features meet fp32
  prototypes in a matmul and it fails. The values stay bf16-rounded, as in the reference
  (fssam_deploy's `memory_bf16_round=True`, the default).

usage: python _reference_runner.py REF_DIR DINOV2_DIR IN.pt OUT.npz
IN.pt holds: checkpoint path, sam2_config, dino, shots, num_refine, refine, and the
episode tensors x (B,3,S,S), s_x (B,K,3,S,S), s_y (B,K,S,S).
"""

import sys
from types import SimpleNamespace

import numpy as np
import torch


def main(ref_dir: str, dino_dir: str, in_path: str, out_path: str) -> None:
    sys.path[:0] = [ref_dir, dino_dir]
    torch.Tensor.cuda = lambda self, *a, **k: self
    module_to = torch.nn.Module.to

    def to_cpu(self, *a, **k):  # build_sam2_video_predictor moves the model to "cuda"
        a = tuple("cpu" if str(x).startswith("cuda") else x for x in a)
        if str(k.get("device", "")).startswith("cuda"):
            k["device"] = "cpu"
        return module_to(self, *a, **k)

    torch.nn.Module.to = to_cpu
    from dinov2.hub import backbones

    torch.hub.load = lambda repo, name, **kw: getattr(backbones, name)(pretrained=False)
    spec = torch.load(in_path, weights_only=False)
    from model import FSSAM, FSSAM5s
    from sam2.modeling.sam.transformer import RoPEAttention
    from sam2.sam2_video_predictor import SAM2VideoPredictor

    RoPEAttention.Weighted_GAP = staticmethod(FSSAM.Weighted_GAP)
    add_new_mask_batch = SAM2VideoPredictor.add_new_mask_batch

    def add_new_mask_fp32(self, *a, **k):  # bf16-rounded memory, back in fp32 (see above)
        low_res, obj_ptr, mem, mem_pos = add_new_mask_batch(self, *a, **k)
        return low_res, obj_ptr, mem.float(), mem_pos

    SAM2VideoPredictor.add_new_mask_batch = add_new_mask_fp32
    module = FSSAM if spec["shots"] == 1 else FSSAM5s
    args = SimpleNamespace(zoom_factor=8, shot=spec["shots"], data_set="pascal", print_freq=10,
                           sam2_weight=None, sam2_config=f"{spec['sam2_config']}.yaml",
                           ver_dino=spec["dino"], num_refine=spec["num_refine"], ver_refine=spec["refine"])
    model = module.OneModel(args)
    sd = torch.load(spec["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)
    model.eval()
    torch.set_grad_enabled(False)
    x, s_x, s_y = spec["x"], spec["s_x"], spec["s_y"]
    out, priors = model(x=x, s_x=s_x, s_y=s_y, y_m=None)
    np.savez(out_path, logits=out.float().numpy(), priors=priors.float().numpy())


if __name__ == "__main__":
    main(*sys.argv[1:5])
