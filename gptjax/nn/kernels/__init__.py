"""Fused attention kernels behind gptjax.nn.attention's switch: Pallas flash, cuDNN, TPU splash."""

from gptjax.nn.kernels.cudnn import cudnn_attention, cudnn_unsupported
from gptjax.nn.kernels.flash_pallas import flash_attention
from gptjax.nn.kernels.sharded import context_mesh, mesh_platform, shard_kernel
from gptjax.nn.kernels.splash import splash_attention, splash_unsupported

__all__ = ["context_mesh", "cudnn_attention", "cudnn_unsupported", "flash_attention",
           "mesh_platform", "shard_kernel", "splash_attention", "splash_unsupported"]
