"""SyncBatchNorm for DDP that keeps timm's fused BatchNorm + activation layers intact.

Lightning's ``trainer.sync_batchnorm: true`` converts layers with torch's
``SyncBatchNorm.convert_sync_batchnorm``, which turns timm's ``BatchNormAct2d`` (BatchNorm followed by its
ReLU, used throughout the Xception-65 backbone) into a plain ``SyncBatchNorm`` and so silently drops the
activation: the converted network computes another function. :class:`SyncBatchNorm` converts with
``timm.layers.convert_sync_batchnorm`` instead (plain BatchNorm -> ``SyncBatchNorm``, ``BatchNormAct2d``
-> ``SyncBatchNormAct``), and reverts both after fitting.

:class:`~deeplab_lit.cli.DeepLabCLI` installs it whenever ``trainer.sync_batchnorm`` is true; in code,
pass ``plugins=[SyncBatchNorm()]`` to the Trainer.
"""

from __future__ import annotations

import torch
from lightning.pytorch.plugins import TorchSyncBatchNorm
from torch import nn

# timm is imported inside the methods: the CLI imports this module for every run, timm is slow to import
# (BENCHMARKS.md, "Command-line start-up and the quickstart"), and a model without timm layers needs none
# of it.


class SyncBatchNorm(TorchSyncBatchNorm):
    """Lightning ``LayerSync`` plugin: synchronised BatchNorm that keeps fused norm + activation layers."""

    def apply(self, model: nn.Module) -> nn.Module:
        """Convert every BatchNorm (timm's fused ones included) to its synchronised variant."""
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(model)

    def revert(self, model: nn.Module) -> nn.Module:
        """Turn synchronised layers back into ordinary ones, ``SyncBatchNormAct`` into ``BatchNormAct2d``."""
        return super().revert(_revert_norm_act(model))


def _revert_norm_act(module: nn.Module) -> nn.Module:
    """Replace each ``SyncBatchNormAct`` below ``module`` by a ``BatchNormAct2d`` sharing its state."""
    from timm.layers import BatchNormAct2d
    from timm.layers.norm_act import SyncBatchNormAct

    if isinstance(module, SyncBatchNormAct):
        # timm annotates momentum as a float; like torch's BatchNorm, its base, it also takes None
        plain = BatchNormAct2d(
            module.num_features,
            module.eps,
            module.momentum,  # type: ignore[arg-type]
            module.affine,
            module.track_running_stats,
        )
        # timm's convert_sync_batchnorm sets act and drop on SyncBatchNormAct without declaring them
        plain.act, plain.drop = module.act, module.drop  # type: ignore[assignment]
        if module.affine:
            with torch.no_grad():
                plain.weight, plain.bias = module.weight, module.bias
        plain.running_mean, plain.running_var = module.running_mean, module.running_var
        plain.num_batches_tracked = module.num_batches_tracked
        plain.train(module.training)
        return plain
    for name, child in module.named_children():
        module.add_module(name, _revert_norm_act(child))
    return module
