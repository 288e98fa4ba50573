"""A tiny random-weights Llama with a real (offline-trained) tokenizer, for fast engine tests.

The weights are random, so the text is gibberish, but everything around it is real: a byte-level
BPE tokenizer with special tokens and a ChatML chat template, safetensors weights, a
``config.json`` the registry reads as a text model. It builds in well under a second and loads
with ``AutoModelForCausalLM`` / ``AutoTokenizer`` just as a downloaded model does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model writes short answers, and a large
model writes long ones. Every morning the team pulls a new model, serves it to the office, and
asks it questions about the weather, the trains and the lunch menu.
Redis keeps the shared state: which models exist, which tasks run, which answers are cached.
When a worker dies its task goes back to the queue, and another worker picks it up again.
Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris is
the capital of France, and Berlin is the capital of Germany. One, two, three, four, five.
Once upon a time there was a little robot who liked to count the stars in the night sky.
It counted one star, then another, until the sun came up and the stars went away.
"""

BOS = "<|startoftext|>"
EOS = "<|im_end|>"
PAD = "<|endoftext|>"
IM_START = "<|im_start|>"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tokenizer() -> Any:
    """The tiny model's tokenizer (byte-level BPE trained on :data:`CORPUS`, ChatML template),
    for builders of other tiny models to start from (``tests/vision_models.py``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[PAD, BOS, IM_START, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[IM_START],  # v5 name (additional_special_tokens is deprecated)
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(path: Path, *, seed: int = 0) -> Path:
    """Write a tiny random Llama causal LM and its tokenizer into ``path``; return ``path``.

    Different seeds give different weights (and so different outputs and fingerprints). The
    EOS row of the output layer is shrunk so that EOS is practically never the greedy choice:
    a random model would otherwise often stop after a token or two.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(path)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id].mul_(0.05)
    model.save_pretrained(path)
    return path
