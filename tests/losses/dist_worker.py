"""Worker for test_loss_distributed.py: run under torchrun with 2 gloo processes.

Each rank computes the Objective on its rows against all ranks' gathered features, backpropagates,
and averages the parameter gradients over ranks as DistributedDataParallel does. Every rank also
computes the single-process gradient on the whole global batch. Rank 0 writes the largest
difference per loss to the JSON file named on the command line.
"""

import json
import math
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dinorankclip.losses import LOSS_DEFAULTS, FeatureGather, Objective

GLOBAL_BATCH = 12
IN_DIM, EMBED_DIM, TEACHER_DIM = 10, 8, 6
CASES = {
    "clip": {"name": "clip"},
    "cyclip": {"name": "cyclip"},
    "alip": {"name": "alip"},
    "rankclip": {"name": "rankclip", "rank_weight": 1.0},
    "dinorankclip R=3": {"name": "dinorankclip", "order": 3, "rank_weight": 1.0, "top_k": 7},
}


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(IN_DIM, EMBED_DIM)
        self.text = nn.Linear(IN_DIM, EMBED_DIM)
        self.student = nn.Linear(IN_DIM, TEACHER_DIM)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(12.0)))

    def forward(self, x_img, x_txt, x_cap):
        img = F.normalize(self.image(x_img), dim=1)
        return {
            "image_features": img,
            "text_features": F.normalize(self.text(x_txt), dim=1),
            "second_text_features": F.normalize(self.text(x_cap), dim=1),
            "logit_scale": self.logit_scale.exp(),
            "image_gate": torch.sigmoid(img),
            "text_gate": None,
            "student_patch_levels": (
                self.student(x_img)[:, None, :].expand(-1, 3, -1) * torch.arange(1.0, 4.0)[:, None],
            ),
            "student_global": self.student(x_img),
            "text_student": self.student(x_txt),
        }


def build(case):
    torch.manual_seed(0)
    model = TinyModel().double()
    objective = Objective(SimpleNamespace(**{**LOSS_DEFAULTS, **CASES[case]}), EMBED_DIM).double()
    if objective.ranking.transition is not None:
        with torch.no_grad():
            for scale in objective.ranking.transition.scale:
                scale.fill_(0.5)
    return model, objective


def gradients(case, rows, dist_context):
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(GLOBAL_BATCH, IN_DIM, generator=gen, dtype=torch.float64) for _ in range(3)]
    patch = torch.randn(GLOBAL_BATCH, 3, TEACHER_DIM, generator=gen, dtype=torch.float64)
    teacher = SimpleNamespace(
        cls=torch.randn(GLOBAL_BATCH, TEACHER_DIM, generator=gen, dtype=torch.float64)[rows],
        patch_levels=(patch[rows],),
    )
    model, objective = build(case)
    outputs = model(*(x[rows] for x in inputs))
    loss = objective(outputs, teacher, progress=1.0, dist=dist_context)["loss"]
    loss.backward()
    params = [*model.parameters(), *objective.parameters()]
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = GLOBAL_BATCH // world
    results = {}
    for case in CASES:
        grads = gradients(case, slice(rank * local, (rank + 1) * local), FeatureGather())
        for grad in grads:
            dist.all_reduce(grad)
            grad /= world
        reference = gradients(case, slice(0, GLOBAL_BATCH), None)
        results[case] = {
            "max_abs_diff": max((g - r).abs().max().item() for g, r in zip(grads, reference, strict=True)),
            "max_abs_grad": max(r.abs().max().item() for r in reference),
        }
    if rank == 0:
        with open(sys.argv[1], "w") as out:
            json.dump(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
