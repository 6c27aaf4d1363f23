"""A model judge for answers no rule can verify (DeepSeek-R1, section 2.3.3: "a generative reward
model, feeding the ground-truth and model predictions into DeepSeek-V3 for judgment").

    judge_prompt(question, reference, prediction) ─► judge model ─► " yes" | " no"

Two implementations of one interface (`Judge.judge(items) -> list[bool]`):
- `LocalJudge`: any local HF causal LM; the verdict is the likelier of the two verdict
  continuations of the prompt (two forward passes per batch, no sampling).
- `OpenAIJudge`: an OpenAI-compatible endpoint (vLLM, SGLang, a hosted model), asked for a
  short greedy completion of the same prompt whose first word is the verdict.

(torch and the engines are imported where a judge is built: Ray Data workers that only need
the prompt format don't pay for them.)
"""
from __future__ import annotations

from typing import NamedTuple, Protocol

JUDGE_TEMPLATE = ("Judge whether the prediction matches the reference answer. Question: {question} "
                  "Reference: {reference} Prediction: {prediction} Verdict:")
VERDICTS = {True: " yes", False: " no"}


class JudgeItem(NamedTuple):
    question: str
    reference: str
    prediction: str


def judge_prompt(item: JudgeItem) -> str:
    return JUDGE_TEMPLATE.format(question=item.question, reference=item.reference.strip(),
                                 prediction=item.prediction.strip())


class Judge(Protocol):
    def judge(self, items: list[JudgeItem]) -> list[bool]: ...


class LocalJudge:
    """A local HF causal LM as judge: 'yes' when the prompt followed by " yes" is likelier than
    followed by " no" (sum of the verdict tokens' log-probabilities; any tokenizer)."""

    def __init__(self, model, tokenizer, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.verdict_ids = {v: tokenizer(text, add_special_tokens=False)["input_ids"] for v, text in VERDICTS.items()}

    def judge(self, items: list[JudgeItem]) -> list[bool]:
        import torch

        self.model.eval()
        out: list[bool] = []
        with torch.no_grad():
            for start in range(0, len(items), self.batch_size):
                prompts = self.tokenizer([judge_prompt(it) for it in items[start : start + self.batch_size]],
                                         add_special_tokens=False)["input_ids"]
                scores = {v: self._logprob(prompts, ids) for v, ids in self.verdict_ids.items()}
                out += (scores[True] > scores[False]).tolist()
        return out

    def _logprob(self, prompts: list[list[int]], verdict: list[int]):
        """log p(verdict | prompt) for each prompt; right-padded, so positions are unchanged."""
        import torch

        seqs = [p + verdict for p in prompts]
        width = max(map(len, seqs))
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=self.model.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=self.model.device)
        logprobs = self.model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
        total = torch.zeros(len(seqs), device=self.model.device)
        for i, p in enumerate(prompts):
            positions = torch.arange(len(p) - 1, len(p) - 1 + len(verdict), device=self.model.device)
            total[i] = logprobs[i, positions, torch.tensor(verdict, device=self.model.device)].sum()
        return total


class OpenAIJudge:
    """An OpenAI-compatible completions endpoint as judge: greedy, a few tokens, first word."""

    def __init__(self, base_url: str, model: str, api_key: str = "EMPTY", concurrency: int = 8):
        from r1core.engine import OpenAIEngine

        self.engine = OpenAIEngine(base_url, model, api_key=api_key, concurrency=concurrency)

    def judge(self, items: list[JudgeItem]) -> list[bool]:
        from r1core.engine import Sampling

        replies = self.engine.generate([judge_prompt(it) for it in items], 1,
                                       Sampling(temperature=0.0, max_new_tokens=3))
        return [parse_verdict(r.text) for r in replies]


def parse_verdict(reply: str) -> bool:
    """True only for a reply whose first word is 'yes' (case and punctuation aside)."""
    words = reply.strip().split()
    return bool(words) and words[0].strip(".,!:;\"'").casefold() == "yes"
