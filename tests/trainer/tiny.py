"""A tiny Llama + BPE tokenizer built offline, and a small deterministic instruction dataset."""

from __future__ import annotations

import json
import os
import random

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = [
    "red",
    "green",
    "blue",
    "cat",
    "dog",
    "bird",
    "one",
    "two",
    "three",
    "four",
    "five",
    "apple",
    "pear",
    "plum",
    "sun",
    "moon",
    "star",
    "reverse",
    "repeat",
    "count",
    "list",
    "the",
    "of",
    "and",
    "is",
    "what",
    "answer",
    "question",
]


def dataset_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Learnable alpaca rows: repeat or reverse a few words (varied lengths)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS[:18]) for _ in range(rng.randint(2, 12))]
        if rng.random() < 0.5:
            rows.append({"instruction": "repeat", "input": " ".join(words), "output": " ".join(words)})
        else:
            rows.append({"instruction": "reverse", "input": " ".join(words), "output": " ".join(words[::-1])})
    return rows


def preference_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """{prompt, chosen, rejected}: reverse a few words; chosen is right, rejected keeps the order and adds
    a filler (a difference a few DPO steps learn even on the tiny model)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS[:18]) for _ in range(rng.randint(2, 6))]
        rows.append(
            {
                "prompt": "reverse " + " ".join(words),
                "chosen": " ".join(words[::-1]),
                "rejected": " ".join([*words, "the", "of", "the"]),
            }
        )
    return rows


def write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def make_tokenizer(out_dir: str, chat_template: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [" ".join(WORDS)] * 20 + [
        "Below is an instruction that describes a task. ### Instruction: "
        "### Input: ### Response: user assistant system"
    ] * 20
    tk.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    if chat_template:
        tok.chat_template = CHATML
    tok.save_pretrained(out_dir)
    return tok


def make_model_dir(out_dir: str, seed: int = 0) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    tok = make_tokenizer(out_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(out_dir)
    return out_dir
