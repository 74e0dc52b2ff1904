"""Bytes of the integer [T, E]-sized tensors one LASER policy call allocates (T=16384, E=256, k=8, device path).

In-place ops and views are not counted; an older checkout: PYTHONPATH=<checkout> python scripts/laser_temporaries.py
"""
import os

os.environ["CAPAWARE_DEVICE_PATH"] = "1"

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from megatron_capaware import policies as P  # noqa: E402

T, E, K = 16384, 256, 8

class Sizes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.by = {}
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        if name.endswith("_") or name in ("aten.view", "aten.detach", "aten.alias", "aten._unsafe_view"):
            return out  # in place or a view: no new memory
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.numel() >= T * E // 2 and not t.is_floating_point() \
                    and t.dtype != torch.bool:
                key = (str(func.overloadpacket), str(t.dtype))
                n, b = self.by.get(key, (0, 0))
                self.by[key] = (n + 1, b + t.numel() * t.element_size())
        return out

gen = torch.Generator().manual_seed(0)
scores = torch.softmax(torch.randn(T, E, generator=gen) * 2, -1)
idx = torch.topk(scores, K, dim=1).indices
with torch.no_grad(), Sizes() as m:
    P.laser(scores, K, 0.9, 0.3, 16, waves=8, rounds=1, normalize=True, check_values=False, topk_indices=idx,
            weights=False, return_decision=True)
total = sum(b for _, b in m.by.values())
for k, (n, b) in sorted(m.by.items()):
    print(f"{k[0]:28s} {k[1]:12s} x{n:3d} {b/1e6:8.1f} MB")
print(f"integer [T, E]-sized outputs: {total/1e6:.1f} MB created per call (scores [T, E] fp32: {T*E*4/1e6:.1f} MB)")
