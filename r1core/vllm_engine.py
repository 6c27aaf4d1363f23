"""vLLM as a GRPO rollout engine: the body of a `rollout.backend: vllm` worker.

This module runs in vLLM's own environment (`make vllm-env`; vLLM's pins clash with Prefect's),
inside a Ray actor started with that environment's Python (`tasks.rollout_workers`). Nothing
on the trainer's side imports vllm: it is imported here, lazily, in the actor.

    trainer rank 0 ── publish(v) ─┬─ checkpoint: a safetensors version directory ──► every engine
                                  │   reloads it with vLLM's own weight loader (any topology)
                                  └─ nccl: chunks ──► `tasks.rollout_workers.NCCLWeightSender` ══ NCCL broadcast ══► engines
                                      (vLLM's native weight transfer; falls back to checkpoint)
    submit(step) ─► engine j: token-id prompts, n samples, the sampled tokens' log-probs

Prompts go in as token ids made by the trainer's tokenizer, and samples come back as token ids
with vLLM's raw log-probs of them (before temperature and top-p, which is how the trainer scores
them), so the update trains on exactly what was sampled and TIS compares like with like.
"""
from __future__ import annotations

import os
import time

from r1core.engine import Rollout, Sampling


class CheckpointReload:
    """vLLM worker extension (`worker_extension_cls`): runs in every vLLM worker process."""

    def r1_load_weight_version(self, path: str, version: int) -> int:
        """Load a `write_weight_version` directory into this worker's model; returns the tensors."""
        from r1core.rollout_sources import read_weight_version

        count = 0
        for chunk in read_weight_version(path, version):
            self.model_runner.model.load_weights(weights=chunk.items())  # vLLM's loader: TP slicing, fused qkv
            count += len(chunk)
        return count


class VLLMSampler:
    """One vLLM engine (`tensor_parallel_size` GPUs) holding a copy of the policy."""

    def __init__(self, model_dir: str, settings: dict, weight_sync: str, version: int = -1):
        from transformers import AutoTokenizer
        from vllm import LLM

        kwargs = {}
        if weight_sync == "nccl":
            from vllm.config import WeightTransferConfig

            kwargs["weight_transfer_config"] = WeightTransferConfig(backend="nccl")
        self.llm = LLM(model=model_dir, tensor_parallel_size=settings["tensor_parallel_size"],
                       gpu_memory_utilization=settings["gpu_memory_utilization"], dtype=settings["dtype"],
                       enforce_eager=settings["enforce_eager"], enable_sleep_mode=settings["colocate"],
                       worker_extension_cls=f"{__name__}.CheckpointReload", seed=0, **kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.version = version  # -1: samples only once a version is published; 0: model_dir as it is
        self.sleeping: set[str] = set()  # what `sleep` freed and no `wake_up` restored yet

    def ping(self) -> int:
        return os.getpid()

    def world_size(self) -> int:
        return self.llm.llm_engine.vllm_config.parallel_config.world_size

    # ---------------------------------------------------------------- weights
    def load_checkpoint(self, version: int, path: str) -> float:
        t0 = time.perf_counter()
        self._wake("weights")
        counts = self.llm.collective_rpc("r1_load_weight_version", args=(path, version))
        if not counts or min(counts) == 0:
            raise RuntimeError(f"weight version {version} at '{path}': no tensor loaded ({counts})")
        self._loaded(version)
        return time.perf_counter() - t0

    def init_nccl(self, master_address: str, master_port: int, rank_offset: int, world_size: int) -> None:
        self.llm.init_weight_transfer_engine({"init_info": {"master_address": master_address,
                                                            "master_port": master_port,
                                                            "rank_offset": rank_offset, "world_size": world_size}})

    def load_nccl(self, version: int, chunk_specs: list[dict]) -> float:
        """Receive weight `version` from `NCCLWeightSender.send`, one `update_weights` per chunk."""
        t0 = time.perf_counter()
        self._wake("weights")
        self.llm.start_weight_update(is_checkpoint_format=True)
        for spec in chunk_specs:
            self.llm.update_weights({"update_info": {**spec, "packed": True}})
        self.llm.finish_weight_update()
        self._loaded(version)
        return time.perf_counter() - t0

    def _loaded(self, version: int) -> None:
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights
        self.version = version

    # ---------------------------------------------------------------- colocation
    def sleep(self) -> None:
        """Free the GPU for the trainer's update. Level 2 discards the weights rather than copying
        them to host memory: the next publish replaces every tensor anyway."""
        if not self.sleeping:
            self.llm.sleep(level=2)
            self.sleeping = {"weights", "kv_cache"}

    def _wake(self, *tags: str) -> None:
        todo = [t for t in tags if t in self.sleeping]
        if todo:
            self.llm.wake_up(tags=todo)
            self.sleeping -= set(todo)

    # ---------------------------------------------------------------- sampling
    def generate(self, prompts: list[str], n: int, sampling: Sampling) -> tuple[list[Rollout], float]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from r1core.tokenizer import decode_completion

        if self.version < 0:
            raise RuntimeError("no weights loaded: publish a version before generating")
        t0 = time.perf_counter()
        self._wake("weights", "kv_cache")
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        params = [SamplingParams(n=n, temperature=sampling.temperature, top_p=sampling.top_p,
                                 max_tokens=sampling.max_new_tokens, logprobs=0, detokenize=False,
                                 seed=None if sampling.seed is None else sampling.seed + i)
                  for i in range(len(prompts))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)
        rollouts = []
        for i, out in enumerate(outputs):
            for c in out.outputs:
                tokens = list(c.token_ids)
                logprobs = [step[t].logprob for t, step in zip(tokens, c.logprobs, strict=True)]
                rollouts.append(Rollout(i, decode_completion(self.tokenizer, tokens), tokens,
                                        "stop" if c.finish_reason == "stop" else "length", logprobs, self.version))
        return rollouts, time.perf_counter() - t0


def chunk_spec(chunk: dict) -> dict:
    """What an engine's `update_weights` needs to know of a chunk before its tensors arrive."""
    return {"names": list(chunk), "dtype_names": [str(t.dtype).removeprefix("torch.") for t in chunk.values()],
            "shapes": [list(t.shape) for t in chunk.values()]}
