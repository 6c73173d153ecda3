"""Where the frozen teacher lives during training: its own device, replicated next to the student, or sharded like it.

- `teacher_device` set: the teacher is moved there whole, nothing else.
- One process or DDP: `accelerator.prepare_model(evaluation_mode=True)` puts it on the student's device.
- FSDP2: sharded with `fully_shard` on the student's mesh, each decoder layer its own unit (gathered one at a time
  in the forward, freed right after), then the root; with the student's mixed-precision and offload policies.
- FSDP1: replicated on each process's device, with a warning (FSDP1's flat parameters would hide the LM head that
  the loss reads).
- DeepSpeed ZeRO-0/1/2: TRL's `prepare_deepspeed` (an inference engine).
- DeepSpeed ZeRO-3: refused; ZeRO-3 partitions both LM heads, which the chunked loss reads directly.

Why not `accelerator.prepare_model(teacher, evaluation_mode=True)` under FSDP: accelerate then neither wraps nor moves
the model, so the teacher stays on the CPU (what TRL found in trl#6573). And why not TRL's `prepare_fsdp` for FSDP2:
it calls `fully_shard` on the root only, and FSDP2 never reshards the root after a forward, so after the first step
the whole teacher stays gathered on every process: no memory saved.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace
from typing import Any

from torch import nn

from ..losses import LMHead

logger = logging.getLogger(__name__)

__all__ = ["fully_shard_teacher", "place_teacher", "teacher_lm_head"]


def _layer_class_names(model: nn.Module, fsdp_plugin: Any = None) -> set[str]:
    names = getattr(fsdp_plugin, "transformer_cls_names_to_wrap", None) or getattr(model, "_no_split_modules", None)
    return set(names or ())


def fully_shard_teacher(
    teacher: nn.Module,
    *,
    mesh: Any = None,
    mp_policy: Any = None,
    layer_class_names: set[str] | None = None,
    offload_policy: Any = None,
) -> nn.Module:
    """Shard a frozen teacher with FSDP2 (`torch.distributed.fsdp.fully_shard`), one unit per decoder layer.

    Each module whose class name is in `layer_class_names` (by default the model's `_no_split_modules`, the decoder
    layers) becomes its own unit, resharded after its forward, so a forward holds one gathered layer at a time; the
    root unit (embeddings, final norm, LM head) is sharded too and, as FSDP2 does for every root, stays gathered after
    a forward: the loss reads the teacher's LM head right after it.

    Args:
        teacher (`nn.Module`): The teacher, frozen, on any device (its shards move to the mesh's device).
        mesh (`torch.distributed.device_mesh.DeviceMesh`, *optional*): The student's FSDP mesh; by default the whole
            world on the current device type.
        mp_policy (`torch.distributed.fsdp.MixedPrecisionPolicy`, *optional*): The student's mixed-precision policy.
        layer_class_names (`set[str]`, *optional*): Class names of the modules sharded as their own units.
        offload_policy (`torch.distributed.fsdp.OffloadPolicy`, *optional*): The student's CPU offload policy.

    Returns:
        `nn.Module`: The same module, sharded in place and in eval mode.

    Raises:
        ValueError: If no module of `teacher` matches `layer_class_names` (it would be gathered whole in every
            forward).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard

    names = layer_class_names if layer_class_names is not None else _layer_class_names(teacher)
    kwargs: dict[str, Any] = {
        "mesh": mesh,
        "mp_policy": mp_policy or MixedPrecisionPolicy(),
        "offload_policy": offload_policy or OffloadPolicy(),
        "reshard_after_forward": True,
    }
    layers = [module for module in teacher.modules() if type(module).__name__ in names and module is not teacher]
    if not layers:
        raise ValueError(
            f"Cannot shard the teacher ({type(teacher).__name__}) layer by layer: none of its modules is one of "
            f"{sorted(names) or 'its `_no_split_modules` (empty)'}. Set `fsdp_transformer_layer_cls_to_wrap` in the "
            "accelerate config to the teacher's decoder layer class, or give the teacher its own `teacher_device`."
        )
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(teacher, **kwargs)
    return teacher.eval()


def _fsdp2_kwargs(accelerator: Any) -> dict[str, Any]:
    # The same mesh and policies accelerate gives the student (accelerate's `fsdp2_prepare_model`, 1.15)
    plugin = accelerator.state.fsdp_plugin
    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is not None:
        mesh = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    return {"mesh": mesh, "mp_policy": plugin.mixed_precision_policy, "offload_policy": plugin.cpu_offload}


def place_teacher(teacher: nn.Module, accelerator: Any, teacher_device: str | None = None) -> nn.Module:
    """Put the frozen teacher where the training step runs it next to the prepared student (see the module docstring).

    Args:
        teacher (`nn.Module`): The frozen teacher.
        accelerator (`accelerate.Accelerator`): The trainer's accelerator.
        teacher_device (`str`, *optional*): `DistillationConfig.teacher_device`; when set, the teacher goes there
            whole.

    Returns:
        `nn.Module`: The teacher to call in the training step.

    Raises:
        NotImplementedError: Under DeepSpeed ZeRO-3.
    """
    if teacher_device is not None:
        return teacher.to(teacher_device)
    if getattr(teacher, "hf_device_map", None) is not None:
        # Placed by its own `device_map` (e.g. "auto" with CPU/disk offload for a teacher bigger than the GPU):
        # accelerate's hooks move each layer's weights and inputs where they run, so it stays as loaded
        return teacher.eval()
    from accelerate.utils import DistributedType

    state = accelerator.state
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        stage = getattr(state.deepspeed_plugin, "zero_stage", 0)
        if stage == 3:
            raise NotImplementedError(
                "DeepSpeed ZeRO-3 is not supported by DistillationTrainer yet: ZeRO-3 partitions the LM heads of both "
                "models, which the chunked loss reads directly. Use `--accelerate_config fsdp2` (student and teacher "
                "sharded), ZeRO-2, or a teacher on its own device (`teacher_device`)."
            )
        from trl.models import prepare_deepspeed

        return prepare_deepspeed(teacher, accelerator)
    if accelerator.is_fsdp2:
        return fully_shard_teacher(
            teacher, layer_class_names=_layer_class_names(teacher, state.fsdp_plugin), **_fsdp2_kwargs(accelerator)
        )
    if accelerator.distributed_type == DistributedType.FSDP:
        warnings.warn(
            "Under FSDP1 the teacher is not sharded: a full copy sits on each process's device. Use FSDP2 "
            "(`fsdp_version: 2`, e.g. `--accelerate_config fsdp2`) to shard it like the student.",
            stacklevel=3,
        )
        return teacher.to(accelerator.device).eval()
    return accelerator.prepare_model(teacher, evaluation_mode=True)


def teacher_lm_head(teacher: nn.Module) -> LMHead:
    """The teacher's LM head, gathered: read it right after the teacher's forward.

    FSDP2 keeps the root unit (which holds the LM head) gathered after a forward; should a root ever be resharded,
    it is gathered here again rather than handing the loss a shard. A head offloaded by a `device_map` (CPU or disk)
    is loaded and copied to its execution device for the loss.
    """
    head = LMHead.from_model(teacher)
    if type(head.weight).__name__ == "DTensor" and hasattr(teacher, "unshard"):
        teacher.unshard()
        head = LMHead.from_model(teacher)
    elif head.weight.device.type == "meta":  # offloaded by a `device_map`: load a copy where the head runs
        from accelerate.utils import align_module_device

        with align_module_device(teacher.get_output_embeddings()):
            loaded = LMHead.from_model(teacher)
            bias = None if loaded.bias is None else loaded.bias.detach().clone()
            head = replace(loaded, weight=loaded.weight.detach().clone(), bias=bias)
    return head
