"""LoRAEnsemble against a DeepEnsemble of the same ViT: step time, memory, trainable parameters.

    python benchmarks/lora.py            # ViT-Small width (embed 384, depth 6, 6 heads), 32x32, patch 8, M = 4
    python benchmarks/lora.py --quick    # depth 2, batch 8, fewer repetitions

Options ``--embed``, ``--depth``, ``--patch``, ``--batch``, ``--rank``, ``--members`` change the setting
(activation memory grows with batch x tokens, parameter memory with width^2 x depth).

All numbers come from one run on the same inputs; ratios are "LoRA / deep" (< 1: LoRA smaller/faster).
Memory is reported two ways:

* *tensor accounting* (exact, noise-free): parameters + gradients + Adam states + tensors saved for
  backward in one training step (unique storages, model weights excluded);
* *peak RSS*: each model trains in a fresh subprocess; the kernel's peak-RSS counter (VmHWM) is
  reset after the model and optimiser are built and warmed up, and the peak over the timed steps
  minus the process's RSS before the model was built is reported (includes allocator slack).

The deep ensemble's members are re-initialised copies; the LoRA ensemble shares one frozen copy.
Compute still scales with M for both (members' hidden states differ from the first adapted layer
on); LoRA saves the frozen weights' gradients and optimiser states, not forward FLOPs.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys

import torch
import torch.nn.functional as F
from _timing import median_ms
from torch import nn


def make_vit(cfg: argparse.Namespace) -> nn.Module:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=cfg.patch,
        in_chans=3,
        embed_dim=cfg.embed,
        depth=cfg.depth,
        num_heads=cfg.embed // 64,
        num_classes=10,
    )


def make_ensemble(kind: str, cfg: argparse.Namespace) -> nn.Module:
    """``deep-vmap`` / ``deep-loop``: DeepEnsemble executions; ``lora``: LoRAEnsemble."""
    import warnings

    from lightning_ensembles import DeepEnsemble
    from lightning_ensembles.ensembles.lora import LoRAEnsemble

    warnings.filterwarnings("ignore", message=".*performance drop.*")  # vmap of SDPA on CPU: measured, not hidden
    vit = make_vit(cfg)
    if kind.startswith("deep"):
        return DeepEnsemble(vit, num_members=cfg.members, execution=kind.split("-")[1])
    return LoRAEnsemble(vit, num_members=cfg.members, rank=cfg.rank)


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _step_fn(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        F.cross_entropy(out.flatten(0, 1), y.repeat(out.shape[0])).backward()
        opt.step()

    return step


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct storages autograd saves for backward in one forward (model weights excluded)."""
    weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(seen.values())


def _rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(kind: str, cfg: argparse.Namespace, steps: int = 2) -> dict:
    """Runs in a fresh process: peak RSS of training ``kind`` (MiB above the pre-model baseline)."""
    import timm  # noqa: F401  (imports before the baseline: only the model and its training count)

    import lightning_ensembles  # noqa: F401
    from lightning_ensembles.ensembles import lora  # noqa: F401

    torch.set_num_threads(2)
    torch.manual_seed(0)
    x, y = torch.randn(cfg.batch, 3, 32, 32), torch.randint(0, 10, (cfg.batch,))
    gc.collect()
    base = _rss_kib()
    model = make_ensemble(kind, cfg)
    gc.collect()
    opt = torch.optim.Adam(_trainable(model), lr=1e-4)
    step = _step_fn(model, opt, x, y)
    step()  # allocates gradients and Adam states
    gc.collect()
    try:  # reset the kernel's peak-RSS counter to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    for _ in range(steps):
        step()
    return {"peak_mib": (_rss_kib("VmHWM") - base) / 1024, "hwm_reset": reset}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--embed", type=int, default=384)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--worker", choices=["deep-vmap", "deep-loop", "lora"], help=argparse.SUPPRESS)
    cfg = parser.parse_args()
    cfg.depth = cfg.depth or (2 if cfg.quick else 6)
    cfg.batch = cfg.batch or (8 if cfg.quick else 16)
    reps = 2 if cfg.quick else 5
    if cfg.worker:
        print(json.dumps(worker(cfg.worker, cfg)))
        return

    torch.set_num_threads(2)
    torch.manual_seed(0)
    x, y = torch.randn(cfg.batch, 3, 32, 32), torch.randint(0, 10, (cfg.batch,))
    rows = {}
    for kind in ("deep-vmap", "deep-loop", "lora"):
        model = make_ensemble(kind, cfg)
        params = _trainable(model)
        opt = torch.optim.Adam(params, lr=1e-4)
        step = _step_fn(model, opt, x, y)
        train_ms = median_ms(step, reps)
        model.eval()
        with torch.no_grad():
            fwd_ms = median_ms(lambda model=model: model(x), reps)
        model.train()
        n_train = sum(p.numel() for p in params)
        n_all = sum(p.numel() for p in model.parameters())
        state_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + 3 * n_train * 4  # grad, Adam m, v
        act_bytes = saved_activation_bytes(model, x)
        args = [
            "--embed",
            str(cfg.embed),
            "--patch",
            str(cfg.patch),
            "--depth",
            str(cfg.depth),
            "--members",
            str(cfg.members),
            "--rank",
            str(cfg.rank),
            "--batch",
            str(cfg.batch),
        ]
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", kind, *args], capture_output=True, text=True, check=True
        )
        peak = json.loads(proc.stdout.strip().splitlines()[-1])
        rows[kind] = {
            "fwd_ms": fwd_ms,
            "train_ms": train_ms,
            "trainable": n_train,
            "params": n_all,
            "state_mib": state_bytes / 2**20,
            "act_mib": act_bytes / 2**20,
            "acct_mib": (state_bytes + act_bytes) / 2**20,
            "peak_mib": peak["peak_mib"],
        }
        del model, opt, step
        gc.collect()

    dv, dl, lo = rows["deep-vmap"], rows["deep-loop"], rows["lora"]
    print(
        f"ViT (embed {cfg.embed}, depth {cfg.depth}, heads {cfg.embed // 64}, 32x32, patch {cfg.patch}), "
        f"M = {cfg.members}, LoRA rank {cfg.rank}, batch {cfg.batch}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, CPU\n"
    )
    print("| metric | Deep (vmap) | Deep (loop) | LoRA | LoRA / best deep | target |")
    print("|---|---|---|---|---|---|")
    spec = [
        ("forward, eval (ms, median)", "fwd_ms", "{:.1f}", ""),
        ("training step (ms, median)", "train_ms", "{:.1f}", "<= 1.1"),
        ("trainable parameters", "trainable", "{:,}", "< 0.10"),
        ("all parameters (incl. frozen)", "params", "{:,}", ""),
        ("params + grads + Adam (MiB)", "state_mib", "{:.1f}", ""),
        ("saved activations (MiB)", "act_mib", "{:.1f}", ""),
        ("training memory, accounted (MiB)", "acct_mib", "{:.1f}", "< 0.5"),
        ("training peak RSS above baseline (MiB)", "peak_mib", "{:.1f}", "< 0.5"),
    ]
    for label, key, fmt, target in spec:
        best = min(dv[key], dl[key])  # compare with the better deep-ensemble execution
        print(
            f"| {label} | {fmt.format(dv[key])} | {fmt.format(dl[key])} | {fmt.format(lo[key])} | "
            f"{lo[key] / best:.3f} | {target} |"
        )


if __name__ == "__main__":
    main()
