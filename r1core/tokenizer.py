"""A small byte-level BPE tokenizer trained on the corpus, as a transformers fast tokenizer.

Digits are split one per token (as in Llama), so arithmetic is learned digit by digit rather
than memorised as opaque number tokens; a digit keeps the space before it (" 3" is one token),
so copying a one-digit operand is copying one token. The R1 tags (think, summary, answer) are
reserved added tokens: always one token, never split, saved and reloaded with the model via
`save_pretrained`. They are deliberately not
flagged `special` in the HF sense, because HF decoders (TRL, `transformers serve`, vLLM's
default) drop special tokens from the text, and the format reward would then never see them.
"""
from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
R1_TAGS = ["<think>", "</think>", "<summary>", "</summary>", "<answer>", "</answer>"]

# A chat template that passes the user's text through verbatim: the R1-Zero prompt is already
# the whole conversation, and OpenAI-compatible chat servers then see exactly that prompt.
PASSTHROUGH_CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r" ?\d"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    core.add_tokens([AddedToken(t, normalized=False, special=False) for t in R1_TAGS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
    )
    tok.chat_template = PASSTHROUGH_CHAT_TEMPLATE
    return tok


def sft_length(tokenizer, prompt: str, completion: str) -> int:
    """Tokens an SFT example takes: prompt and completion tokenized apart (as SFT packs them)
    plus the EOS after the completion."""
    encode = tokenizer([prompt, completion], add_special_tokens=False)["input_ids"]
    return len(encode[0]) + len(encode[1]) + 1


def decode_completion(tokenizer, token_ids) -> str:
    """Decode dropping padding and EOS, keeping everything else."""
    drop = {tokenizer.pad_token_id, tokenizer.eos_token_id}
    return tokenizer.decode([t for t in token_ids if t not in drop], skip_special_tokens=False)
