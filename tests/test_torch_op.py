"""Kernels as torch custom ops, callable from eager code and from torch.compile without graph breaks."""
import torch

from pacekern_ops.gemv import gemv_bf16


def test_custom_op_eager_and_compiled():
    op = gemv_bf16.as_torch_op()
    assert gemv_bf16.as_torch_op() is op                          # registered once
    x, w = torch.randn(2, 48), torch.randn(40, 48).bfloat16()
    y = torch.empty(2, 40)
    torch.ops.pacekern.gemv_bf16(x, w, y)
    torch.testing.assert_close(y, x @ w.float().t(), rtol=1e-4, atol=1e-4)

    @torch.compile(backend="eager", fullgraph=True)                # fullgraph: a graph break would raise
    def layer(x, w):
        y = torch.empty(x.shape[0], w.shape[0])
        torch.ops.pacekern.gemv_bf16(x, w, y)
        return torch.relu(y) + 1.0

    torch.testing.assert_close(layer(x, w), torch.relu(x @ w.float().t()) + 1.0, rtol=1e-4, atol=1e-4)
