"""Worker for tests/test_teacher_placement.py: a teacher sharded with FSDP2 over gloo (CPU) gives the same loss as the
whole teacher, and holds only its shard of each decoder layer between forwards. Run under torchrun with 2 processes."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tiny import make_model  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from hf_distill.losses import HiddenStateTeacher, LMHead, chunked_distillation_loss  # noqa: E402
from hf_distill.model_forward import forward_hidden_states  # noqa: E402
from hf_distill.teachers.placement import fully_shard_teacher, teacher_lm_head  # noqa: E402


def loss_with(teacher, student, inputs):
    with torch.no_grad():
        hidden = forward_hidden_states(teacher, inputs).hidden
        head = teacher_lm_head(teacher)
    student_hidden = forward_hidden_states(student, inputs).hidden
    out = chunked_distillation_loss(
        student_hidden.flatten(0, 1), LMHead.from_model(student), HiddenStateTeacher(hidden.flatten(0, 1), head),
        divergence="generalized_jsd", temperature=2.0,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(out.loss, student.lm_head.weight)
    return out.loss.item(), grad


def main(output: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    vocab = 97
    student, teacher = make_model(vocab, seed=1), make_model(vocab, hidden_size=48, seed=2).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    inputs = {"input_ids": torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(rank))}
    reference = loss_with(teacher, student, inputs)
    full_numel = {name: p.numel() for name, p in teacher.named_parameters()}

    fully_shard_teacher(teacher, mesh=init_device_mesh("cpu", (world,)))
    results = [loss_with(teacher, student, inputs) for _ in range(2)]  # the second: after a first reshard
    layer_params = {n: p for n, p in teacher.named_parameters() if ".layers." in n}
    sharded_between_steps = all(
        isinstance(p, DTensor) and p.to_local().numel() < full_numel[n] for n, p in layer_params.items()
    )
    report = {
        "rank": rank,
        "reference_loss": reference[0],
        "sharded_losses": [r[0] for r in results],
        "max_grad_diff": max((r[1] - reference[1]).abs().max().item() for r in results),
        "layers_sharded_between_steps": sharded_between_steps,
        "layer_local_fraction": sum(p.to_local().numel() for p in layer_params.values())
        / sum(full_numel[n] for n in layer_params),
    }
    Path(output).joinpath(f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
