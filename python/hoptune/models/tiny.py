"""The built-in tiny model: a Llama-architecture causal LM and a character-level tokenizer, both
built in code (no download, no shipped weights), deterministic for a given seed.

The tokenizer has one token per character plus Llama-like special tokens and a chat template
(``<s><|user|>...<|end|><|assistant|>...<|end|>``) that has no ``{% generation %}`` markers,
so the chat loss mask is found by rendering prefixes (see hoptune.data.formatting). Dimensions
are multiples of 64 so every linear layer can be stored in NF4 (blocks of 64).
"""

from __future__ import annotations

import string
from typing import Any

import torch

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHARS = " \n" + string.digits + string.ascii_lowercase + string.ascii_uppercase + "+-*/=?.,:;!'\"()[]<>#%&_"
VOCAB_SIZE = 128  # tokens in use: len(SPECIAL_TOKENS) + len(CHARS); the rest is room to grow

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

TINY_CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def build_tokenizer() -> Any:
    """A character-level ``PreTrainedTokenizerFast`` with BOS added on encode, EOS ``</s>``, PAD and
    the chat template above. Identical on every call."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + list(CHARS))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # one token per character ("." would leave runs of newlines together, as one unknown token)
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=TINY_CONFIG["max_position_embeddings"],
    )


def build_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> Any:
    """A randomly initialised tiny ``LlamaForCausalLM`` (same weights for the same seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok_ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    config = LlamaConfig(**{**TINY_CONFIG, **tok_ids, **overrides})
    config.use_cache = False
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only: torch.manual_seed would also reseed every GPU's, which
        # fork_rng(devices=[]) does not put back
        torch.default_generator.manual_seed(seed)
        model = LlamaForCausalLM(config)
    stop_at_end_of_turn(model)
    return model.to(dtype)


def stop_at_end_of_turn(model: Any) -> None:
    """``generate()`` stops at a chat turn's end (``<|end|>``) as well as at ``</s>``: the chat
    template ends each turn with the former, which a generation config with ``</s>`` alone runs past."""
    model.generation_config.eos_token_id = [SPECIAL_TOKENS.index("</s>"), SPECIAL_TOKENS.index("<|end|>")]
