import torch

from bnp.kernels import count_kernels


def test_count_kernels_counts_computing_ops_not_views():
    x = torch.ones(3, 2)
    assert count_kernels(lambda: x.add(1).t().unsqueeze(0).mul_(2).detach()) == 2
    assert count_kernels(lambda: None) == 0
