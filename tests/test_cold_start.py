"""Cold-start data by rules: route prompts, rewriting R1-Zero outputs, verification and
filters, selection; and SFT packing (loss on responses only, examples kept apart)."""
import pytest
import torch

from r1core.cold_start import (
    finish_candidate,
    parse_steps,
    rejection_reason,
    rewrite_readable,
    route_prompts,
    select,
)
from r1core.config import ModelConfig, SFTConfig
from r1core.modeling import build_model
from r1core.problems import final_of, long_cot, readable_response
from r1core.rewards import is_readable
from r1core.training import TrainContext, pack_examples, sft_train

MICRO = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64)


def _row(rows, language, task="chain_sum"):
    return next(r for r in rows[0] if r["language"] == language and r["task"] == task and len(r["steps"]) == 2)


def test_route_prompts(rows):
    train = rows[0]
    row = _row(rows, "ru")
    few = route_prompts("few_shot", [row, *train[:40]], shots=2, separator="</s>", seed=0)[0]["generation_prompt"]
    docs = few.split("</s>")
    direct = route_prompts("direct", [row], 2, "</s>", 0)[0]["generation_prompt"]
    assert direct.startswith("Реши по шагам") and direct.endswith(row["question"])
    assert len(docs) == 3 and docs[-1] == direct
    assert all(d.startswith("Реши") and "<summary>" in d and "Проверка" in d and row["question"] not in d
               for d in docs[:2])
    assert route_prompts("rewrite_r1_zero", [row], 2, "</s>", 0)[0]["generation_prompt"] == row["prompt"]
    with pytest.raises(ValueError, match="unknown cold-start route 'vibes'"):
        route_prompts("vibes", [row], 2, "</s>", 0)


def test_r1_zero_outputs_are_rewritten_readable_in_the_prompts_language(rows):
    row = _row(rows, "ru")
    (a, op1, b, c), (_, op2, d, e) = row["steps"]
    words = {"+": "plus", "-": "minus"}
    # R1-Zero style: mixed languages and symbols, terse, no summary
    zero = f"<think> {a} {words[op1]} {b} is {c}. {c} {op2} {d} = {e}. </think> <answer> {row['answer']} </answer>"
    readable = rewrite_readable(row, zero)
    assert readable == readable_response(*long_cot(row), row["answer"])
    assert is_readable(readable, "ru") and "Проверка" in readable
    assert rewrite_readable(row, zero.replace(f"<answer> {row['answer']} ", "<answer> 99 ")) is None  # unverified
    assert rewrite_readable(row, zero.replace(f"= {e}.", f"= {e + 1}.")) is None  # a wrong step
    assert rewrite_readable(row, f"<think> hmm </think> <answer> {row['answer']} </answer>") is None  # no steps
    assert parse_steps("7 times 3 is 21. 21 минус 1 будет 20.") == [[7, "*", 3, 21], [21, "-", 1, 20]]


def test_every_candidate_gets_a_verdict(rows):
    row = _row(rows, "en")
    good = readable_response(*long_cot(row), final_of(row))
    mixed = readable_response(*long_cot(row, ["en", "ru"]), final_of(row))
    cases = {
        "": "empty",
        good: None,
        good.replace("<summary>", "").replace("</summary>", ""): "malformed",
        good.replace(f"<answer> {row['answer']} </answer>", "<answer> 99 </answer>"): "unverified",
        mixed: "language_mixing",
        good.replace("<think>", "<think> " + "so " * 60): "too_long",
    }
    for text, reason in cases.items():
        example = finish_candidate({**row, "route": "direct", "completion": text}, max_words=60)
        assert example["rejection"] == (reason or ""), text
        assert rejection_reason(example, 60) == reason
    zero = finish_candidate({**row, "route": "rewrite_r1_zero", "completion": "<think> x </think> <answer> 1 </answer>"}, 60)
    assert zero["rejection"] == "not_rewritable"


def test_select_dedupes_and_caps_per_problem(rows):
    row = _row(rows, "en")
    good = finish_candidate({**row, "route": "direct", "completion": readable_response(*long_cot(row), final_of(row))}, 60)
    spaced = {**good, "completion": good["completion"].replace(" ", "  ")}
    bad = {**good, "rejection": "unverified"}
    other = {**good, "route": "few_shot", "completion": good["completion"].replace("So the answer", "So, the answer")}
    assert select([bad, good, spaced, other], per_problem=2) == [good, other]
    assert select([good, other], per_problem=1) == [good]


def test_packing_masks_prompts_and_keeps_examples_apart(tokenizer, rows):
    examples = [{"prompt": r["prompt"][-40:], "completion": readable_response(*long_cot(r), final_of(r))}
                for r in rows[0][:6]]
    packed = pack_examples(tokenizer, examples, seq_len=256)
    assert len(packed["input_ids"]) < len(examples)  # several examples share a row
    first = examples[0]
    p = tokenizer(first["prompt"], add_special_tokens=False)["input_ids"]
    c = tokenizer(first["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert packed["labels"][0, : len(p)].eq(-100).all()
    assert packed["labels"][0, len(p) : len(p) + len(c)].tolist() == c
    # the second example in a packed row sees only itself: same logits as alone
    model = build_model(MICRO, tokenizer).eval()
    n = len(p) + len(c)
    second = packed["position_ids"][0].tolist().index(0, 1)
    m = packed["position_ids"][0].tolist().index(0, second + 1) if 0 in packed["position_ids"][0, second + 1 :] else 256
    with torch.no_grad():
        together = model(input_ids=packed["input_ids"][:1], position_ids=packed["position_ids"][:1],
                         use_cache=False).logits
        alone = model(input_ids=packed["input_ids"][:1, second:m]).logits
    assert second == n
    torch.testing.assert_close(together[0, second:m], alone[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="SFT example 0 has"):
        pack_examples(tokenizer, examples, seq_len=16)


def test_sft_learns_the_readable_format(tokenizer, rows, tmp_path):
    examples = [{"prompt": r["question"], "completion": readable_response(*long_cot(r), final_of(r))}
                for r in rows[0][:64]]
    packed = pack_examples(tokenizer, examples, seq_len=256)
    cfg = SFTConfig(epochs=8, batch_size=4, lr=1e-2, warmup_steps=2, checkpoint_every=1000)
    ctx = TrainContext(tmp_path)
    sft_train(cfg.model_copy(update={"log_every": 2}), build_model(MICRO, tokenizer), packed, ctx, seed=0)
    losses = [m["loss"] for _, m in ctx.history]
    assert len(ctx.history) and ctx.history[-1][0] == cfg.epochs * -(-len(packed["input_ids"]) // cfg.batch_size)
    assert losses[-1] < 0.6 * losses[0]


def test_a_seed_file_row_without_a_completion_is_named(tmp_path, rows):
    from r1core.problems import write_rows
    from tasks.cold_start import _seed_requests

    path = tmp_path / "seed.jsonl"
    write_rows([{**rows[0][0], "completion": "<think> a </think> <answer> 1 </answer>"}, rows[0][1]], path)
    with pytest.raises(ValueError, match=r"seed.jsonl: row 2 lacks required column 'completion'"):
        _seed_requests(str(path))
