"""torch.ops.vecinfer.attention: the custom operator's schema and fake implementation
(torch.library.opcheck), and a torch.compile(fullgraph=True) trace equal to the eager call."""
from __future__ import annotations

import pytest
import torch

import vecinfer
import vecinfer.custom_ops  # noqa: F401  (registers torch.ops.vecinfer.attention)
from test_attention import Case


def _args(case, max_coded):
    return (case.q, case.key_codes, case.value_codes, case.lengths, case.key_codebook, case.value_codebook,
            case.sink_k, case.sink_v, case.recent_k, case.recent_v, case.key_scale, case.key_mean, case.value_mean,
            case.hadamard, 0.125, max_coded)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck(gen, dtype):
    case = Case(gen, d=64, dtype=dtype, tq=2, lengths=[4, 37, 9, 0, 17, 3])
    torch.library.opcheck(torch.ops.vecinfer.attention.default, _args(case, 37))


def test_compiled_fullgraph_equals_eager(gen):
    case = Case(gen, d=64, dtype=torch.float32, tq=1, lengths=[4, 37, 9, 2, 17, 3])

    def step(q, *rest):
        return torch.ops.vecinfer.attention(q * 2, *rest)[0] + 1

    args = _args(case, 37)
    eager = step(*args)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(*args)
    torch.testing.assert_close(compiled, eager)
    assert not torch.isnan(eager).any()


@pytest.mark.skipif(not vecinfer.cuda_available(), reason="needs a CUDA GPU (sm_80+)")
def test_opcheck_cuda_with_lengths_on_device(gen):
    case = Case(gen, d=128, dtype=torch.float16, tq=1, lengths=[4, 300, 128, 0, 77, 40]).to("cuda")
    case.lengths = case.lengths.cuda()  # on the device: no host synchronisation, graph-capturable
    torch.library.opcheck(torch.ops.vecinfer.attention.default, _args(case, 300))
