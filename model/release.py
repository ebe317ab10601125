"""Tensor names of the authors' release (github:lvliang6879/ScaleMatch, model/semseg/deeplabv3plus_scalematch.py) and
their counterparts in ScaleMatchNet, so that the release's checkpoints load here.

A release checkpoint is what its ScaleMatch.py saves: {'model': state_dict, 'optimizer', 'epoch', 'previous_best'},
with 'module.' prefixes after a DistributedDataParallel run (SyncBatchNorm keeps BatchNorm's names).
"""
import re
from collections import OrderedDict
from collections.abc import Mapping

import torch

# (release pattern, replacement): the first full match renames a tensor; the backbone's names are the same in both.
RENAMES = [
    (r"backbone\.(.+)", r"segmenter.backbone.\1"),
    (r"head\.b([0-3])\.(.+)", r"segmenter.aspp.branches.\1.\2"),
    (r"head\.b4\.gap\.([12])\.(.+)", lambda m: f"segmenter.aspp.branches.4.conv.{int(m[1]) - 1}.{m[2]}"),
    (r"head\.project\.(.+)", r"segmenter.aspp.project.\1"),
    (r"reduce\.(.+)", r"segmenter.reduce.\1"),
    (r"fuse\.([0134])\.(.+)", lambda m: f"segmenter.fuse.{int(m[1]) // 3}.{int(m[1]) % 3}.{m[2]}"),
    (r"classifier\.(.+)", r"segmenter.classifier.\1"),
    (r"RWKV_layers\.reduce\.(.+)", r"cif.reduce.\1"),
    (r"RWKV_layers\.layers\.(\d+)\.norm([12])\.(.+)", r"cif.rwkv.\1.ln\2.\3"),
    (r"RWKV_layers\.layers\.(\d+)\.layer_scale_([12])", r"cif.rwkv.\1.gamma\2"),
    (r"RWKV_layers\.layers\.(\d+)\.attn\.(.+)", r"cif.rwkv.\1.att.\2"),
    (r"RWKV_layers\.layers\.(\d+)\.mlp\.(.+)", r"cif.rwkv.\1.ffn.\2"),
    (r"RWKV_layers\.norm\.(.+)", r"cif.norm.\1"),
    (r"se_block\.fc1\.(.+)", r"cif.attention.squeeze.\1"),
    (r"se_block\.fc2\.(.+)", r"cif.attention.excite.\1"),
    (r"scale_attn\.(.+)", r"cif.gate_head.\1"),
]
_RENAMES = [(re.compile(pattern), replacement) for pattern, replacement in RENAMES]


class ReleaseStateError(Exception):
    """A state dict that is not the release's ScaleMatch network, told in one line."""


def project_name(release_name: str) -> str | None:
    """The ScaleMatchNet name of a release tensor name (without 'module.'), or None when no rule covers it."""
    for pattern, replacement in _RENAMES:
        match = pattern.fullmatch(release_name)
        if match:
            return replacement(match) if callable(replacement) else match.expand(replacement)
    return None


def release_state_dict(checkpoint: object, source: str) -> "OrderedDict[str, torch.Tensor]":
    """The network tensors of a release checkpoint: its 'model' entry (or the file itself when it is a bare state
    dict), 'module.' prefixes removed."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    if not isinstance(state, Mapping) or not state or not all(torch.is_tensor(t) for t in state.values()):
        raise ReleaseStateError(f"{source}: not a release checkpoint (expected a state dict of tensors, or a dict "
                                f"whose 'model' is one)")
    return OrderedDict((name.removeprefix("module."), tensor) for name, tensor in state.items())


def _names(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f", ... ({len(names) - shown} more)" if len(names) > shown else "")


def convert_state_dict(release_state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                       source: str) -> "OrderedDict[str, torch.Tensor]":
    """Rename (and, where only the layout differs, reshape) the release's tensors to fill ``target``, the state dict
    of the ScaleMatchNet they are meant for. Every tensor must find its place and every place must be filled."""
    converted, unexpected = OrderedDict(), []
    for name, tensor in release_state.items():
        ours = project_name(name)
        if ours is None or ours not in target:
            unexpected.append(name)
            continue
        expected = target[ours].shape
        if tensor.shape != expected:
            # The release keeps Vision-RWKV's mix ratios as (1, 1, C); here they are (C,).
            if tensor.numel() != target[ours].numel() or tensor.dim() <= len(expected):
                raise ReleaseStateError(f"{source}: '{name}' has shape {tuple(tensor.shape)}, the config's network "
                                        f"needs {tuple(expected)} for '{ours}' (another nclass, backbone or CIF size?)")
            tensor = tensor.reshape(expected)
        converted[ours] = tensor
    if unexpected:
        raise ReleaseStateError(f"{source}: {len(unexpected)} unexpected tensor(s) for this config's network: "
                                f"{_names(unexpected)}")
    missing = [name for name in target if name not in converted]
    if missing:
        raise ReleaseStateError(f"{source}: {len(missing)} tensor(s) missing for this config's network: "
                                f"{_names(missing)}")
    return OrderedDict((name, converted[name]) for name in target)
