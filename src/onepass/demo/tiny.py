"""Tiny assets built locally (nothing is downloaded): a byte-level BPE tokenizer and a Llama-style
model from a config. Used by the demo, the tests and the benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onepass.data.chat_template import builtin_template

# Every control token of the built-in templates, so any of them can be tried with the tiny tokenizer.
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>", "[INST]", "[/INST]"]

BASE_CORPUS = """\
The quick brown fox jumps over the lazy dog. A user asks a question and the assistant answers it.
What is the capital of France? Paris is the capital of France. Of course! Here is the answer.
Hello, how are you today? I am fine, thank you. Please tell me a story about a cat and a dog.
system user assistant tool model think reasoning answer question remember name color number
Translate to French: I love to learn. J'aime apprendre. List the primary colors: red, yellow and blue.
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - * / = ( ) [ ] { } < > : ; , . ! ? ' " \\n
"""


def build_tokenizer(output_dir: str | Path, extra_text: list[str] | None = None, vocab_size: int = 512,
                    chat_template: str = "chatml") -> Any:
    """Train a tiny byte-level BPE tokenizer and save it as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(BASE_CORPUS.splitlines() * 4 + list(extra_text or []), trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                      pad_token="<pad>")
    wrapped.chat_template = builtin_template(chat_template)
    wrapped.save_pretrained(str(output_dir))
    return wrapped


def build_model(output_dir: str | Path | None, vocab_size: int, hidden_size: int = 64, num_layers: int = 2,
                num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                max_position_embeddings: int = 2048, seed: int = 0, tie_embeddings: bool = False) -> Any:
    """A small random Llama-style causal LM (GQA, RoPE, SwiGLU; the output layer tied to the input
    embedding if `tie_embeddings`), saved if `output_dir` is given."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, max_position_embeddings=max_position_embeddings,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=tie_embeddings)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if output_dir is not None:
        model.save_pretrained(str(output_dir))
    return model


WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this from or had "
         "by word but what some we can out other were all there when up use your how said an each she which do "
         "their time if will way about many then them write would like so these her long make thing see him two "
         "has look more day could go come did number sound no most people my over know water than call first "
         "who may down side been now find any new work part take get place made live where after back little "
         "only round man year came show every good me give our under name very through just form sentence great "
         "think say help low line differ turn cause much mean before move right boy old too same tell does set "
         "three want air well also play small end put home read hand port large spell add even land here must").split()


def random_conversations(count: int, seed: int = 0, max_turns: int = 4, system_share: float = 0.3) -> list[dict]:
    """Synthetic multi-turn `messages` records of varied length (for benchmarks and stress tests)."""
    import random

    rng = random.Random(seed)

    def sentence(low: int, high: int) -> str:
        words = rng.choices(WORDS, k=rng.randint(low, high))
        return " ".join(words).capitalize() + rng.choice(".?!")

    records = []
    for _ in range(count):
        messages = [{"role": "system", "content": sentence(5, 20)}] if rng.random() < system_share else []
        for _ in range(rng.randint(1, max_turns)):
            messages.append({"role": "user", "content": " ".join(sentence(4, 30) for _ in range(rng.randint(1, 3)))})
            messages.append({"role": "assistant",
                             "content": " ".join(sentence(4, 30) for _ in range(rng.randint(1, 6)))})
        records.append({"messages": messages})
    return records
