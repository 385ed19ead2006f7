"""Tiny assets built locally (nothing is downloaded): a byte-level BPE tokenizer and a Llama-style
model from a config. Used by the demo, the tests and the benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onepass.chat_template import builtin_template

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
                max_position_embeddings: int = 2048, seed: int = 0) -> Any:
    """A small random Llama-style causal LM (GQA, RoPE, SwiGLU), saved if `output_dir` is given."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, max_position_embeddings=max_position_embeddings,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if output_dir is not None:
        model.save_pretrained(str(output_dir))
    return model
