"""Forward+backward time and peak extra memory of each loss, as ratios to ``clip_loss``.

Run from the repository root::

    PYTHONPATH=src python benchmarks/loss_bench.py [--sizes 256 1024 4096] [--dim 512] [--repeats 5]

Times are the minimum over ``--repeats`` rounds. Every round runs each loss once in turn, so the
ratios compare measurements taken side by side under the same machine load. Peak extra memory is
the growth of the process's peak resident set size (VmHWM) during one forward+backward pass, run
in a fresh subprocess per loss and size after one warm-up pass at N = 64, so it counts every
allocation (torch and numpy) and no memory cached by earlier large runs. Linux only (it reads
/proc/self/status).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from dinorankclip.losses import LOSS_DEFAULTS, AlipLoss, Objective, clip_loss, cyclip_loss

LOGIT_SCALE = 1 / 0.07


def make_inputs(num: int, dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Return correlated unit image, text and second-caption features [num, dim] that require grad."""
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(num, dim, generator=gen)
    feats = {}
    for name in ("image", "text", "caption"):
        noisy = F.normalize(shared + 0.8 * torch.randn(num, dim, generator=gen), dim=1)
        feats[name] = noisy.requires_grad_(True)
    return feats


def objective_loss(name: str, order: int, dim: int, top_k: int | None, head_dim: int = 32) -> Callable:
    """Return the whole training loss of ``name`` at full ranking weight, through the Objective."""
    cfg = SimpleNamespace(**{**LOSS_DEFAULTS, "name": name, "order": order, "top_k": top_k})
    cfg.transition_heads, cfg.transition_head_dim = 1, head_dim
    objective = Objective(cfg, dim)
    if objective.ranking.transition is not None:
        with torch.no_grad():
            for scale in objective.ranking.transition.scale:
                scale.fill_(0.5)  # non-zero transitions, as after some training

    def loss(f: dict[str, torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
        outputs = {"image_features": f["image"], "text_features": f["text"], "logit_scale": scale}
        return objective(outputs, None, progress=1.0)["loss"]

    return loss


def build_losses(dim: int) -> dict[str, Callable]:
    alip = AlipLoss()
    open_clip_loss = ClipLoss()
    return {
        "clip": lambda f, s: clip_loss(f["image"], f["text"], s),
        "open_clip ClipLoss": lambda f, s: open_clip_loss(f["image"], f["text"], s),
        "cyclip": lambda f, s: cyclip_loss(f["image"], f["text"], s),
        "alip": lambda f, s: alip(f["image"], f["text"], f["caption"], s)["loss"],
        "rankclip (R=1, full lists)": objective_loss("rankclip", 1, dim, None),
        "R=2, top_k=32": objective_loss("dinorankclip", 2, dim, 32),
        "R=3, top_k=32": objective_loss("dinorankclip", 3, dim, 32),
        "R=3, top_k=64": objective_loss("dinorankclip", 3, dim, 64),
        "R=4, top_k=32": objective_loss("dinorankclip", 4, dim, 32),
    }


def run_once(loss: Callable, feats: dict[str, torch.Tensor], scale: torch.Tensor) -> None:
    for tensor in feats.values():
        tensor.grad = None
    loss(feats, scale).backward()


def _read_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def measure_memory(name: str, num: int, dim: int) -> float:
    """Return the peak extra resident memory (MiB) of one forward+backward pass of loss ``name``."""
    loss = build_losses(dim)[name]
    scale = torch.tensor(LOGIT_SCALE, requires_grad=True)
    # A pass at N = 64 first loads libraries and starts thread pools, which are not the loss's memory.
    run_once(loss, make_inputs(64, dim), scale)
    feats = make_inputs(num, dim)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current resident size
    before = _read_status_kib("VmRSS")
    run_once(loss, feats, scale)
    return (_read_status_kib("VmHWM") - before) / 1024


def memory_in_subprocess(name: str, num: int, dim: int) -> float:
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); import loss_bench; "
        f"print(json.dumps(loss_bench.measure_memory({name!r}, {num}, {dim})))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_losses(num: int, dim: int, repeats: int, names: list[str], clock: Callable[[], float]) -> dict[str, float]:
    feats = make_inputs(num, dim)
    scale = torch.tensor(LOGIT_SCALE, requires_grad=True)
    losses = build_losses(dim)
    best = {name: float("inf") for name in names}
    for name in names:
        run_once(losses[name], feats, scale)  # warm-up
    for _ in range(repeats):
        for name in names:
            start = clock()
            run_once(losses[name], feats, scale)
            best[name] = min(best[name], clock() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096], help="batch sizes N")
    parser.add_argument("--dim", type=int, default=512, help="embedding width D")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per size")
    parser.add_argument("--losses", nargs="+", default=None, help="subset of loss names (clip is always run)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed seconds; cpu: this process's CPU seconds (all threads), which other "
        "processes on a shared machine disturb less",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    names = list(build_losses(args.dim))
    if args.losses:
        names = ["clip"] + [n for n in names if n in args.losses and n != "clip"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, D = {args.dim}")
    for num in args.sizes:
        repeats = args.repeats if num < 4096 else max(2, args.repeats // 3)
        times = time_losses(num, args.dim, repeats, names, clock)
        print(f"\nN = {num}")
        print(f"{'loss':<28} {'fwd+bwd ms':>11} {'x clip':>8} {'peak extra MiB':>15}")
        for name in names:
            memory = "" if args.no_memory else f"{memory_in_subprocess(name, num, args.dim):15.0f}"
            ratio = times[name] / times["clip"]
            print(f"{name:<28} {times[name] * 1e3:11.1f} {ratio:8.2f} {memory:>15}", flush=True)


if __name__ == "__main__":
    main()
