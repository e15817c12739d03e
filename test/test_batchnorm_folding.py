"""Batch-norm folding for inference: same function, fewer layers, refused when unsafe."""
import torch
from torch import nn

from vizloc_ros.localize.models import build_model
from vizloc_ros.localize.models.batchnorm_folding import fold_batch_norms


def _randomise_batch_norms(model):
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, as after training
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def test_folded_resnet_computes_the_same_poses_with_no_batch_norm_left():
    torch.manual_seed(0)
    model = _randomise_batch_norms(build_model("mapnet", backbone="resnet18", feat_dim=32))
    folded = fold_batch_norms(model, torch.randn(2, 3, 48, 64))
    assert folded is not model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(3, 3, 48, 64)  # a fresh input, not the check's example
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


class _NotSequential(nn.Module):
    """conv and bn registered next to each other, but bn is applied to the input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.conv(self.bn(x))


def test_a_pair_that_is_not_applied_in_order_is_left_alone():
    model = _randomise_batch_norms(_NotSequential())
    assert fold_batch_norms(model, torch.randn(2, 3, 8, 8)) is model
