"""How one optimizer step's data is laid out: token-budgeted micro-batches, padded or packed.

A step's sequences are split into micro-batches of at most `max_tokens` tokens each (a
worker's budget, `compute.max_tokens_per_microbatch`); gradients accumulate over them and are
synchronised once (`r1core.training.accumulate`). Every worker runs the same number of
micro-batches, since under FSDP each forward gathers parameters collectively: a worker with
fewer sequences runs empty ones (`TokenBatch.empty`).

Rollouts (prompt + completion) are laid out for the GRPO update (`compute.rollout_layout`) as

- **padded**: [left-padded prompt | completion | right padding], one row per rollout, with an
  attention mask;
- **packed**: rollouts placed first-fit into rows as wide as the longest, each with position
  ids restarting at 0 and no attention mask, which transformers reads as separate sequences
  (block-diagonal attention; varlen kernels with flash-attention on GPU). No padding is computed;
- **shared_prompt**: one row per group, [prompt | completion 1 | ... | completion G | padding],
  with a 4D mask in which each completion attends to the prompt and causally to itself only, and
  position ids that continue the prompt's in every completion. Each completion token sees exactly
  what it sees in its own row, so log-probs and gradients are the padded layout's (a test checks
  both), but the group's prompt is computed once instead of G times and its gradient is summed
  there by autograd. It pays where prompts are long against completions (GRPO on short answers:
  ~3x fewer tokens on the tiny profile); its attention is dense over the row (W² for a row of
  width W = prompt + Σ completions), so with thousands of tokens per completion the packed layout
  with flash-attention is the one to use.

Either way a `TokenBatch` says which positions are scored (the position before each completion
token) and which completion token each belongs to, so the log-probs come back as [rollouts,
longest completion] whatever the layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Layout = Literal["padded", "packed", "shared_prompt"]


def split_by_tokens(lengths: list[int], max_tokens: int | None, *, packed: bool) -> list[list[int]]:
    """Consecutive groups of sequence indices whose cost fits `max_tokens` (None: one group).

    The cost of a group is what its forward computes: the sum of lengths when packed, rows ×
    longest when padded. A sequence longer than the budget gets a group of its own."""
    if max_tokens is None or not lengths:
        return [list(range(len(lengths)))]
    groups: list[list[int]] = [[]]
    longest = total = 0
    for i, n in enumerate(lengths):
        cost = total + n if packed else (len(groups[-1]) + 1) * max(longest, n)
        if groups[-1] and cost > max_tokens:
            groups.append([])
            longest = total = 0
        groups[-1].append(i)
        longest, total = max(longest, n), total + n
    return groups


def split_rollouts(prompts: list[list[int]], completions: list[list[int]], max_tokens: int | None,
                   layout: Layout) -> list[list[int]]:
    """Micro-batches (lists of rollout indices) for `layout`, each within `max_tokens` where a
    rollout alone fits. shared_prompt: consecutive rollouts with the same prompt form a row (a new
    row where the next completion would overflow the budget), rows are grouped as padded rows are,
    and two rows of one prompt never share a micro-batch (collation would join them)."""
    if layout != "shared_prompt":
        return split_by_tokens([len(p) + len(c) for p, c in zip(prompts, completions, strict=True)],
                               max_tokens, packed=layout == "packed")
    rows, widths = _shared_rows(prompts, completions, max_tokens)
    groups: list[list[int]] = []
    for members in split_by_tokens(widths, max_tokens, packed=False):
        group: list[int] = []
        for r in members:
            if group and prompts[group[-1]] == prompts[rows[r][0]]:  # the same prompt's next row
                groups.append(group)
                group = []
            group.extend(rows[r])
        groups.append(group)
    return groups


def _shared_rows(prompts: list[list[int]], completions: list[list[int]],
                 max_tokens: int | None = None) -> tuple[list[list[int]], list[int]]:
    """Rows of the shared_prompt layout: runs of consecutive rollouts with the same prompt (a new
    row where the next completion would overflow `max_tokens`), and each row's width."""
    rows: list[list[int]] = []
    widths: list[int] = []
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        if rows and prompts[rows[-1][0]] == p and (max_tokens is None or widths[-1] + len(c) <= max_tokens):
            rows[-1].append(i)
            widths[-1] += len(c)
        else:
            rows.append([i])
            widths.append(len(p) + len(c))
    return rows, widths


def pad_groups(groups: list[list[int]], n: int) -> list[list[int]]:
    """`groups` followed by empty ones up to `n` (every worker runs the same number)."""
    return groups + [[] for _ in range(n - len(groups))]


@dataclass
class TokenBatch:
    """One micro-batch as `r1core.logprobs.TokenScorer` takes it, and where its scored tokens go."""

    input_ids: torch.Tensor  # [R, W]
    position_ids: torch.Tensor  # [R, W]
    attention_mask: torch.Tensor | None  # [R, W]; None when packed; [R, 1, W, W] (bool) sharing prompts
    positions: torch.Tensor  # [N] flat index into [R, W] of the position predicting each scored token
    targets: torch.Tensor  # [N] the scored tokens
    seq: torch.Tensor  # [N] which rollout (0..num_seqs-1) each scored token belongs to
    col: torch.Tensor  # [N] its index in that rollout's completion
    num_seqs: int
    width: int  # the longest completion

    def to(self, device) -> TokenBatch:
        def move(t):
            return None if t is None else t.to(device)

        return TokenBatch(move(self.input_ids), move(self.position_ids), move(self.attention_mask),
                          move(self.positions), move(self.targets), move(self.seq), move(self.col),
                          self.num_seqs, self.width)

    def unflatten(self, values: torch.Tensor) -> torch.Tensor:
        """Per-token values [N] as [num_seqs, width], 0 where a completion has no token."""
        out = values.new_zeros(self.num_seqs, self.width)
        return out.index_put((self.seq, self.col), values)

    def completion_mask(self) -> torch.Tensor:
        return self.unflatten(torch.ones_like(self.targets, dtype=torch.float32))

    def scored(self, scorer, with_entropy: bool = False):
        """log π of the completion tokens (and entropy), each [num_seqs, width]."""
        logp, entropy = scorer(self.input_ids, self.position_ids, self.attention_mask, self.positions,
                               self.targets, with_entropy)
        return self.unflatten(logp), (self.unflatten(entropy) if with_entropy else None)


def collate_rollouts(prompts: list[list[int]], completions: list[list[int]], pad_id: int, *,
                     layout: Layout) -> TokenBatch:
    """Rollouts (prompt ids, completion ids), padded, packed or sharing their prompts (module docstring)."""
    if not prompts:  # an empty micro-batch: one pad token, nothing scored
        return _empty(pad_id)
    if layout == "shared_prompt":
        return _collate_shared_prompt(prompts, completions, pad_id)
    packed = layout == "packed"
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    width = max(1, *(len(c) for c in completions))
    seq, col, positions, targets = [], [], [], []
    if packed:
        row_width = max(lengths)
        rows: list[list[int]] = []  # sequence indices in each row, first fit
        fill: list[int] = []
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            r = next((r for r, used in enumerate(fill) if used + lengths[i] <= row_width), None)
            if r is None:
                rows.append([])
                fill.append(0)
                r = len(rows) - 1
            rows[r].append(i)
            fill[r] += lengths[i]
        input_ids = torch.full((len(rows), row_width), pad_id, dtype=torch.long)
        position_ids = torch.zeros((len(rows), row_width), dtype=torch.long)
        for r, members in enumerate(rows):
            offset = 0
            for i in members:
                ids = prompts[i] + completions[i]
                input_ids[r, offset : offset + len(ids)] = torch.tensor(ids)
                position_ids[r, offset : offset + len(ids)] = torch.arange(len(ids))
                start = r * row_width + offset + len(prompts[i])
                positions.extend(range(start - 1, start - 1 + len(completions[i])))
                seq.extend([i] * len(completions[i]))
                col.extend(range(len(completions[i])))
                targets.extend(completions[i])
                offset += len(ids)
            position_ids[r, offset:] = torch.arange(row_width - offset)  # padding: a sequence of its own
        attention_mask = None
    else:
        prompt_width = max(len(p) for p in prompts)
        row_width = prompt_width + width
        input_ids = torch.full((len(prompts), row_width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), row_width), dtype=torch.long)
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            input_ids[i, prompt_width - len(p) : prompt_width + len(c)] = torch.tensor(p + c)
            attention_mask[i, prompt_width - len(p) : prompt_width + len(c)] = 1
            start = i * row_width + prompt_width
            positions.extend(range(start - 1, start - 1 + len(c)))
            seq.extend([i] * len(c))
            col.extend(range(len(c)))
            targets.extend(c)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    positions, targets, seq, col = (torch.tensor(xs, dtype=torch.long) for xs in (positions, targets, seq, col))
    return TokenBatch(input_ids, position_ids, attention_mask, positions, targets, seq, col, len(prompts), width)


def _collate_shared_prompt(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> TokenBatch:
    rows, widths = _shared_rows(prompts, completions)  # consecutive rollouts with the same prompt share a row
    row_width = max(widths)
    input_ids = torch.full((len(rows), row_width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), row_width), dtype=torch.long)
    segment = torch.full((len(rows), row_width), -1, dtype=torch.long)  # 0: the prompt, k: completion k, -1: padding
    seq, col, positions, targets = [], [], [], []
    for r, members in enumerate(rows):
        prompt = prompts[members[0]]
        input_ids[r, : len(prompt)] = torch.tensor(prompt)
        position_ids[r, : len(prompt)] = torch.arange(len(prompt))
        segment[r, : len(prompt)] = 0
        offset = len(prompt)
        for k, i in enumerate(members, start=1):
            c = completions[i]
            input_ids[r, offset : offset + len(c)] = torch.tensor(c, dtype=torch.long)
            position_ids[r, offset : offset + len(c)] = torch.arange(len(prompt), len(prompt) + len(c))
            segment[r, offset : offset + len(c)] = k
            base = r * row_width
            # token 0 is predicted by the prompt's last position, token t by the completion's t-1
            positions.extend([base + len(prompt) - 1, *range(base + offset, base + offset + len(c) - 1)][: len(c)])
            seq.extend([i] * len(c))
            col.extend(range(len(c)))
            targets.extend(c)
            offset += len(c)
    q, k = segment.unsqueeze(2), segment.unsqueeze(1)  # [R, W, 1] queries, [R, 1, W] keys
    causal = torch.ones(row_width, row_width, dtype=torch.bool).tril()
    visible = causal & (k != -1) & (q != -1) & ((k == 0) | (k == q))
    visible |= torch.eye(row_width, dtype=torch.bool)  # padding sees itself: no row of the softmax is empty
    positions, targets, seq, col = (torch.tensor(xs, dtype=torch.long) for xs in (positions, targets, seq, col))
    return TokenBatch(input_ids, position_ids, visible.unsqueeze(1), positions, targets, seq, col, len(prompts),
                      max(1, *(len(c) for c in completions)))


def _empty(pad_id: int) -> TokenBatch:
    nothing = torch.zeros(0, dtype=torch.long)
    one = torch.full((1, 1), pad_id, dtype=torch.long)
    return TokenBatch(one, torch.zeros_like(one), torch.ones_like(one), nothing, nothing, nothing, nothing, 0, 1)
