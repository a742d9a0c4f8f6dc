"""Small layers shared by several backbone families."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from zoo.ops import LayerNorm, add_layer_norm
from zoo.ops.block_graphs import run_block
from zoo.ops.mlp import calls_hooks, is_identity
from zoo.ops._conv_layers import RewrittenConv2d

__all__ = ["BlockSequence", "ChannelsLastSequential", "DeferredSumBlock", "add_norm", "check_images", "init_linears",
           "channels_last_intermediates", "norm_of_sum", "projection_norm", "run_blocks", "unless_identity"]


class ChannelsLastSequential(nn.Sequential):
    """``nn.Sequential`` run on a channels-last copy of its input; same keys and outputs as ``nn.Sequential``.

    For convolution + BatchNorm stems on full-resolution maps: PyTorch's BatchNorm2d training kernels are far
    slower on NCHW maps than on channels-last ones (H200, torch 2.11, bf16 (64, 32, 112, 112): forward 722 vs
    290 us, forward + backward 2188 vs 557 us), and cuDNN convolutions prefer channels-last too. Copying the
    3-channel image costs little; a first layer computed another way on CUDA (:class:`zoo.ops.SpaceToDepthConv2d`,
    :class:`zoo.ops.PatchConv2d`) reads the image as it is and writes channels-last itself, so it is not copied.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> the stack's output (channels-last strides)."""
        if not (isinstance(self[0], RewrittenConv2d) and self[0].rewrites(x)):  # it reads any layout
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x)


def check_images(x: torch.Tensor, family: str, min_side: int = 1, why: str = "") -> None:
    """Raise ``ValueError`` unless ``x`` is a floating-point (B, C, H, W) batch with H and W >= ``min_side``.

    The models' entry check, so that a wrong input fails with the model's name and the fix rather than deep inside
    a reshape. ``why`` explains ``min_side`` (e.g. the total stride).
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{family} expects images (B, C, H, W), got {got}")
    if not x.is_floating_point():
        raise ValueError(f"{family} expects floating-point images (normalised with the model's pretrained_cfg "
                         f"mean and std), got dtype {x.dtype}")
    if min(x.shape[-2:]) < min_side:
        raise ValueError(f"input size {tuple(x.shape[-2:])} is too small: {family} needs at least {min_side}x"
                         f"{min_side}{f' ({why})' if why else ''}")


def projection_norm(norm_layer: Callable[..., nn.Module], dim: int) -> nn.Module:
    """``norm_layer(dim)`` for a norm whose output only feeds projections (pre-norm blocks, patch merging), with
    :class:`zoo.ops.LayerNorm` in place of a plain ``nn.LayerNorm`` (same eps, parameters and keys).

    Why: PyTorch's CUDA LayerNorm is far from memory bandwidth at the narrow widths of vision stages (H200, bf16
    autocast, (128, 3136, 96): 738 us of kernel time against 42 for zoo's Triton kernel); in eager Agent-Swin-T
    inference it was a third of the GPU time. zoo's norm writes the autocast dtype where ``nn.LayerNorm`` writes
    float32, which the projection would round to the same autocast dtype anyway; so only norms feeding projections
    are swapped, never one whose output is the residual stream or a returned feature. Other norm layers are built
    as given.
    """
    norm = norm_layer(dim)
    if type(norm) is nn.LayerNorm and len(norm.normalized_shape) == 1:
        return LayerNorm(dim, eps=norm.eps, elementwise_affine=norm.elementwise_affine, bias=norm.bias is not None)
    return norm


def add_norm(norm: nn.Module, x: torch.Tensor, branch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + branch, norm(x + branch))``: a pre-norm block's residual sum and its next branch's input, (..., C) each.

    Through :func:`zoo.ops.add_layer_norm` for a :class:`zoo.ops.LayerNorm` (one kernel in eager inference on CUDA:
    the residual add's launch is saved, and eager inference of these backbones waits for the host); any other norm
    gets the plain sum.
    """
    if type(norm) is LayerNorm:  # (so its parameters are in its dict: not parametrized, whose class is another)
        params = norm._parameters
        return add_layer_norm(x, branch, params["weight"], params["bias"], norm.eps)
    total = x + branch
    return total, norm(total)


def norm_of_sum(norm: nn.Module, x: torch.Tensor, branch: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + branch, norm(x + branch))`` by :func:`add_norm`, or ``(x, norm(x))`` where ``branch`` is None."""
    return (x, norm(x)) if branch is None else add_norm(norm, x, branch)


class DeferredSumBlock(nn.Module):
    """A pre-norm residual block whose last residual sum its successor may make (``forward_deferred``).

    ``forward_deferred(x, branch, *args) -> (x', branch')`` runs the block on ``x + branch`` (on ``x`` where
    ``branch`` is None) and returns the two terms whose sum is its output. :func:`run_blocks` hands each pair to the
    next block, whose first norm makes the sum with :func:`add_norm`: one kernel in eager inference on CUDA instead
    of the add's and the norm's (eager inference of these backbones waits for the host, and a launch costs it about
    what the add's kernel takes).

    The default is the transformer block ``x + drop_path(attn(norm1(x)))``, then ``+ drop_path(mlp(norm2(.)))``
    over the submodules ``norm1``, ``norm2``, ``mlp``, ``drop_path`` and :meth:`_attention` (``attn`` called with
    the arguments after ``x``); blocks of another shape override ``forward_deferred``.
    """

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The block's output, ``x``'s shape (the arguments after ``x`` are ``forward_deferred``'s)."""
        x, branch = self.forward_deferred(x, None, *args, **kwargs)
        return x + branch

    def forward_deferred(self, x: torch.Tensor, branch: torch.Tensor | None, *args: Any, **kwargs: Any
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x', branch')``, each ``x``'s shape, whose sum is the block's output on ``x + branch``."""
        layers = self._modules  # (``self.norm1`` goes through nn.Module.__getattr__, which eager calls pay for)
        drop_path = layers["drop_path"]
        x, h = norm_of_sum(layers["norm1"], x, branch)
        x, h = add_norm(layers["norm2"], x, unless_identity(drop_path, self._attention(h, *args, **kwargs)))
        return x, unless_identity(drop_path, layers["mlp"](h))

    def _attention(self, h: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The attention branch on the normalised input ``h`` (before the drop path)."""
        return self._modules["attn"](h, *args, **kwargs)


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, *args: Any, checkpointing: bool = False
               ) -> torch.Tensor:
    """Run ``blocks`` in order on ``x`` (each called with ``*args`` after its input); returns the last output.

    :class:`DeferredSumBlock` blocks pass their last residual sum on to the next one's first norm (see there).
    With ``checkpointing`` each block is recomputed in the backward (``torch.utils.checkpoint``); a block with
    forward or backward hooks (or with global ones registered) is called as a module, so its hooks see its whole
    output and its gradients. Each block call goes through :func:`zoo.ops.block_graphs.run_block` (replayed from
    CUDA graphs in eager training where block graphs are on).
    """
    if checkpointing and not torch.jit.is_scripting():
        for blk in blocks:
            x = checkpoint(blk, x, *args, use_reentrant=False)
        return x
    branch = None
    for blk in blocks:
        if isinstance(blk, DeferredSumBlock) and not calls_hooks(blk):
            x, branch = run_block(blk, blk.forward_deferred, x, branch, *args)
        else:
            x = run_block(blk, blk, x if branch is None else x + branch, *args)
            branch = None
    return x if branch is None else x + branch


class BlockSequence(nn.Sequential):
    """``nn.Sequential`` of blocks run by :func:`run_blocks` (same keys and outputs as ``nn.Sequential``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's output (the blocks keep ``x``'s shape: (B, H, W, C) tokens in VOLO)."""
        return run_blocks(self, x)


def unless_identity(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, without the call where the module is the identity now (see :func:`zoo.ops.mlp.is_identity`):
    a module call costs eager inference several microseconds of host time, which an H200 waits for."""
    return x if is_identity(module) else module(x)


def init_linears(model: nn.Module, std: float = 0.02) -> None:
    """The official DeiT/PVT/Swin/CSWin/VOLO/BiFormer init: truncated-normal(``std``) Linear weights, zero biases.

    Linears are visited in module order (the order ``model.apply`` reaches them), so random draws match the
    official code's. Every other layer keeps PyTorch's construction-time init; the official code's explicit
    ones/zeros for norms equal that default.
    """
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def channels_last_intermediates(stage: Callable[[int, torch.Tensor], torch.Tensor], num_stages: int,
                                final_norm: nn.Module, x: torch.Tensor, indices: int | list[int] | None = None,
                                norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                                intermediates_only: bool = False
                                ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
    """timm's ``forward_intermediates`` for a model of stages on channels-last maps with one final norm.

    Args:
        stage: ``stage(i, x)`` runs stage ``i``: images (B, C, H, W) for ``i = 0``, else the previous stage's output;
            returns the (B, H_i, W_i, C_i) map.
        num_stages: how many stages the model has (fewer after pruning).
        final_norm: the model's last norm, sized for the last stage only.
        x: (B, C, H, W) images.
        indices: last n stages if int, these stage indices if a list, all if None.
        norm: apply ``final_norm`` to the last stage's intermediate.
        stop_early: stop after the last requested stage.
        output_fmt: ``'NCHW'`` (B, C_i, H_i, W_i) or ``'NHWC'``.
        intermediates_only: return only the list of intermediates.

    Returns:
        The intermediates, or (final map, normalised when every stage ran, intermediates).
    """
    if output_fmt not in ("NCHW", "NHWC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
    take, max_index = feature_take_indices(num_stages, indices)
    n_run = max_index + 1 if stop_early else num_stages
    feats = []
    for i in range(n_run):
        x = stage(i, x)
        if i in take:
            feat = final_norm(x) if norm and i == num_stages - 1 else x
            feats.append(feat.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else feat)
    if intermediates_only:
        return feats
    return (final_norm(x) if n_run == num_stages else x), feats
