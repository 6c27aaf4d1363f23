"""Peak memory of one GRPO update per worker: micro-batches, chunked log-probs, DDP vs FSDP.

    python bench/memory.py            # this CPU: a random-init Llama-style model, 32k vocabulary
    python bench/memory.py --gpu      # a GPU machine: a ~1B model in bf16, FSDP on every GPU

The step is `r1core.training.policy_update` (what every GRPO stage runs after sampling): the frozen
reference's log-probs, the policy's forward and backward over the step's micro-batches, AdamW, on
fixed random rollouts (prompt 64 tokens, completions of the given length; sampling is planned by
`r1 plan` but not run here). The model is small in width and depth and has a 32k vocabulary, so
that, as in real models, what grows with tokens and vocabulary dominates the step's memory.

Peak memory is that of tensors: on CPU, every storage a tensor op allocates is counted from
allocation to release (`PeakTensorMemory`, a TorchDispatchMode; what `torch.cuda.max_memory_allocated`
counts on GPU), on top of what is live before the step (parameters, AdamW state, the reference,
DDP's gradient buckets). `logits` is the peak of tensors whose last dimension is the vocabulary.
Parameters + gradients + optimizer state are the local storage of those tensors (a shard's, under
FSDP). Each configuration runs in its own process(es); 2 workers talk over gloo.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r1core import parallel  # noqa: E402
from r1core.config import GRPOConfig, ModelConfig, TrainComputeConfig  # noqa: E402
from r1core.logprobs import TokenScorer  # noqa: E402
from r1core.memory_plan import GIB, Architecture, Workload, plan  # noqa: E402
from r1core.modeling import hf_config  # noqa: E402
from r1core.training import TrainContext, TrainSequence, adamw, policy_update  # noqa: E402

VOCAB = 32768
PROMPT = 64
CPU_MODEL = ModelConfig(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=344,
                        max_positions=2048, vocab_size=VOCAB)  # 4.9M parameters, 4.2M of them the embeddings
GPU_MODEL = ModelConfig(hidden_size=2048, num_layers=18, num_heads=16, num_kv_heads=8, intermediate_size=5632,
                        max_positions=8192, vocab_size=VOCAB)  # ~1.0B parameters
H200_BF16_FLOPS = 989e12  # dense bf16 peak of one H200 (SXM)


class PeakTensorMemory(TorchDispatchMode):
    """Live bytes of the storages tensor ops allocate while active, and their peak; `vocab` counts
    tensors whose last dimension is the vocabulary (logits, their softmax and gradients) apart."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.live: dict[int, tuple[int, bool]] = {}
        self.current = self.peak = self.logits = self.logits_peak = 0

    def reset_peak(self) -> None:
        self.peak, self.logits_peak = self.current, self.logits

    def _track(self, t: torch.Tensor) -> None:
        from torch.distributed.tensor import DTensor

        if isinstance(t, DTensor):
            t = t._local_tensor
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.live:
            return
        is_logits = t.dim() >= 1 and t.shape[-1] == self.vocab and t.dim() <= 3 and t.numel() > self.vocab * 8
        self.live[key] = (size, is_logits)
        self.current += size
        self.logits += size if is_logits else 0
        self.peak, self.logits_peak = max(self.peak, self.current), max(self.logits_peak, self.logits)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        size, is_logits = self.live.pop(key, (0, False))
        self.current -= size
        self.logits -= size if is_logits else 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def rollouts(n: int, length: int, seed: int) -> list[TrainSequence]:
    g = torch.Generator().manual_seed(seed)
    return [TrainSequence(torch.randint(3, VOCAB, (PROMPT,), generator=g).tolist(),
             torch.randint(3, VOCAB, (length,), generator=g).tolist(),
             float(torch.randn(1, generator=g))) for _ in range(n)]


def configure(case: dict, gpu: bool) -> GRPOConfig:
    compute = TrainComputeConfig(num_workers=case["workers"], strategy=case["strategy"],
                                 max_tokens_per_microbatch=case["micro"], logits_chunk_tokens=case["chunk"],
                                 use_gpu=gpu, bf16=gpu, gradient_checkpointing=case.get("checkpointing", False))
    return GRPOConfig(prompts_per_step=case["completions"] // 2, group_size=2, beta=0.04, compute=compute)


def worker(rank: int, case: dict, out: str, gpu: bool) -> None:
    world = case["workers"]
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(case["port"]))
        torch.distributed.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    device = torch.device("cuda", rank) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    cfg = configure(case, gpu)
    model_cfg = GPU_MODEL if gpu else CPU_MODEL
    tracker = None if gpu else PeakTensorMemory(VOCAB)
    if tracker:
        tracker.__enter__()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(hf_config(model_cfg, VOCAB))
    reference = AutoModelForCausalLM.from_config(hf_config(model_cfg, VOCAB)).requires_grad_(False)
    ctx = TrainContext(tempfile.mkdtemp())
    ctx.device = device
    ctx.bf16 = gpu
    model = ctx.wrap(TokenScorer(policy, cfg.compute.logits_chunk_tokens), cfg.compute)
    ref = ctx.wrap(TokenScorer(reference, cfg.compute.logits_chunk_tokens), cfg.compute, trainable=False)
    optimizer = adamw(cfg, model)
    share = rollouts(case["completions"], case["length"], seed=0)[rank::world]
    policy_update(cfg, model, ref, optimizer, share, 0, ctx)  # warm-up: AdamW state exists from here on
    optimizer.zero_grad(set_to_none=True)
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        tracker.reset_peak()
    policy_update(cfg, model, ref, optimizer, rollouts(case["completions"], case["length"], seed=1)[rank::world],
                  0, ctx)
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    held = {"parameters": parallel.local_bytes(model.parameters()),
            "gradients": parallel.local_bytes(p.grad for p in model.parameters()),
            "optimizer": parallel.local_bytes(state)}
    if gpu:
        peak, logits_peak = torch.cuda.max_memory_allocated(), None
    else:
        peak, logits_peak = tracker.peak, tracker.logits_peak
        tracker.__exit__(None, None, None)
    timed = rollouts(case["completions"], case["length"], seed=2)[rank::world]
    if gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    policy_update(cfg, model, ref, optimizer, timed, 0, ctx)
    if gpu:
        torch.cuda.synchronize()
    seconds = ctx.max(time.perf_counter() - t0)
    if rank == 0:
        Path(out).write_text(json.dumps({"peak": peak, "logits_peak": logits_peak, **held, "seconds": seconds,
                                         "params_total": sum(p.numel() for p in policy.parameters())}))
    if world > 1:
        torch.distributed.destroy_process_group()


def run_case(case: dict, gpu: bool) -> dict:
    out = tempfile.mktemp(suffix=".json")
    with socket.socket() as s:  # a free port for this case's process group
        s.bind(("127.0.0.1", 0))
        case = {**case, "port": s.getsockname()[1]}
    mp.spawn(worker, args=(case, out, gpu), nprocs=case["workers"], join=True)
    return json.loads(Path(out).read_text())


def estimate(case: dict, gpu: bool) -> float:
    """`r1 plan`'s estimate for the update (its generation term left out: nothing is sampled here)."""
    cfg = configure(case, gpu)
    arch = Architecture.of(hf_config(GPU_MODEL if gpu else CPU_MODEL, VOCAB), "bench")
    p = plan("bench", arch, Workload("grpo_update", case["completions"], PROMPT + case["length"], case["length"],
                                     reference=True), cfg.compute)
    return p.total


NAIVE = {"micro": None, "chunk": 0, "strategy": "ddp", "workers": 1}
BUDGETED = {"micro": 4096, "chunk": 128, "strategy": "ddp", "workers": 1}
CPU_CASES = (
    [{"sweep": "completions", "label": f"{name}", "completions": c, "length": 256, **knobs}
     for c in (16, 32, 64, 128) for name, knobs in (("naive", NAIVE), ("micro+chunk", BUDGETED))
     if not (name == "naive" and c == 128)]  # naive at 128 x 256: ~13 GiB of logits, past this machine
    + [{"sweep": "length", "label": name, "completions": 16, "length": n, **knobs}
       for n in (128, 512, 1024) for name, knobs in (("naive", NAIVE), ("micro+chunk", BUDGETED))]
    + [{"sweep": "knobs", "label": "chunk only", "completions": 32, "length": 256, **{**NAIVE, "chunk": 128}},
       {"sweep": "knobs", "label": "micro only", "completions": 32, "length": 256, **{**BUDGETED, "chunk": 0}}]
    + [{"sweep": "workers", "label": f"2 x {s}", "completions": 64, "length": 256, **{**BUDGETED, "strategy": s,
                                                                                    "workers": 2}}
       for s in ("ddp", "fsdp")]
)
GPU_CASES = [{"sweep": "gpu", "label": f"{w} x fsdp", "completions": c, "length": n, "micro": 16384, "chunk": 4096,
              "strategy": "fsdp", "workers": w, "checkpointing": True}
             for w in sorted({1, torch.cuda.device_count() if torch.cuda.is_available() else 1})
             for c, n in ((64, 1024), (64, 4096))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="the GPU cases (bf16, ~1B model, FSDP)")
    ap.add_argument("--only", help="run the cases of one sweep (completions, length, knobs, workers)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    cases = GPU_CASES if args.gpu else [c for c in CPU_CASES if not args.only or c["sweep"] == args.only]
    rows = []
    header = (f"{'sweep':<12}{'config':<14}{'compl.':>7}{'len':>6}{'peak GiB':>10}{'plan GiB':>10}{'plan/peak':>10}"
              f"{'logits GiB':>11}{'logits %':>9}{'p+g+o MiB':>11}{'tok/s':>9}" + ("  MFU" if args.gpu else ""))
    print(header, flush=True)
    for case in cases:
        r = run_case(case, args.gpu)
        est = estimate(case, args.gpu)
        tokens = case["completions"] * (PROMPT + case["length"])
        held = (r["parameters"] + r["gradients"] + r["optimizer"]) / 2**20
        logits = r["logits_peak"]
        row = {**case, **r, "plan": est, "tokens_per_s": tokens / r["seconds"]}
        rows.append(row)
        line = (f"{case['sweep']:<12}{case['label']:<14}{case['completions']:>7}{case['length']:>6}"
                f"{r['peak'] / GIB:>10.3f}{est / GIB:>10.3f}{est / r['peak']:>10.2f}"
                f"{(logits or 0) / GIB:>11.3f}{(100 * (logits or 0) / r['peak']):>8.0f}%{held:>11.1f}"
                f"{row['tokens_per_s']:>9.0f}")
        if args.gpu:  # 6 N per trained token (forward + backward) + 2 N for the reference's forward
            flops = 8 * r["params_total"] * tokens / case["workers"]
            line += f"  {flops / r['seconds'] / H200_BF16_FLOPS:.1%}"
        print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
