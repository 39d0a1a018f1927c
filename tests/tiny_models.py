"""Tiny random Hugging Face checkpoints built in code, for tests that must run offline and fast.

`make_tiny_model(kind, folder)` writes a complete local HF model folder: config.json, model.safetensors,
generation_config.json and a small BPE tokenizer (tokenizer.json + tokenizer_config.json with a ChatML-like
chat template) trained in code with the `tokenizers` library. Nothing is downloaded.

The configs are deliberately awkward so shape and indexing mistakes show up:
GQA ratios 3:1, 4:1, 2:1 and 1:1, head_dim != hidden_size / num_heads, tied and untied embeddings, q/k/v/o and
MLP biases, Llama 3 RoPE scaling whose original context (16) is well inside the test lengths, linear RoPE,
sliding windows of 8 tokens (Mistral: every layer, Qwen2: per layer, Gemma 2: alternating), Gemma 2 soft-caps
and query_pre_attn_scalar != head_dim, Qwen3 q/k norms. Every parameter (norm weights and biases included,
which HF would initialise to 1 / 0) is drawn at random so that each of them actually changes the output.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

VOCAB_SIZE = 384  # the model's embedding rows; the tokenizer uses the first TOKENIZER_VOCAB of them
TOKENIZER_VOCAB = 320
PAD_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = 0, 1, 2, 3, 4
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
MAX_POSITIONS = 256
INIT_STD = 0.15  # large enough that logits are peaky and greedy choices are not near-ties

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_COMMON = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=MAX_POSITIONS, initializer_range=INIT_STD,
               rms_norm_eps=1e-6, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)

# kind -> (model_type, config kwargs). Comments name what each one is there to exercise.
CONFIGS: dict[str, tuple[str, dict]] = {
    # GQA 3:1, head_dim 24 != 96/6 = 16, untied lm_head, biases on q/k/v/o and on the MLP.
    "llama": ("llama", dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
                            num_key_value_heads=2, head_dim=24, tie_word_embeddings=False, attention_bias=True,
                            mlp_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # Llama 3.1 RoPE scaling, MQA 4:1, tied embeddings. theta=500, head_dim=16 gives wavelengths 6.3, 13.7, 29.7..
    # so with original context 16, low_freq_factor 1 and high_freq_factor 2 (bands at 8 and 16) the first
    # frequency is kept, the second is blended and the rest are divided by `factor`: all three branches run.
    "llama3": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=1, tie_word_embeddings=True,
                             rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 2.0,
                                              "original_max_position_embeddings": 16})),
    # Sliding window 8 on every layer, plain multi-head attention (4/4), head_dim 32 != 64/4.
    "mistral": ("mistral", dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=4, head_dim=32, sliding_window=8, tie_word_embeddings=False,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # q/k/v biases (no o bias), GQA 2:1, tied embeddings, linear RoPE scaling, and Qwen's layer-wise sliding
    # window: layers >= max_window_layers (here layer 1 of 2) use a window of 8, layer 0 attends to everything.
    "qwen2": ("qwen2", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=True,
                            sliding_window=8, max_window_layers=1,
                            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0})),
    # q_norm / k_norm, head_dim 24 != 64/4, GQA 4:1 (MQA), untied.
    "qwen3": ("qwen3", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=1, head_dim=24, tie_word_embeddings=False,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # Alternating sliding (8) / full attention over 3 layers, query_pre_attn_scalar 40 != head_dim 24, soft-caps
    # small enough to bend the scores (attention 5) and the logits (final 8), gelu_tanh, sqrt(D) embed scale.
    "gemma2": ("gemma2", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=40, sliding_window=8,
                              attn_logit_softcapping=5.0, final_logit_softcapping=8.0,
                              hidden_activation="gelu_pytorch_tanh",
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}
KINDS: tuple[str, ...] = tuple(CONFIGS)
# Not in KINDS (no test runs over them all): Gemma 2 with head_dim 16, what ONNX Runtime's GroupQueryAttention
# kernel needs (a multiple of 16), so the --target onnxruntime graphs run its soft-cap and sliding window.
CONFIGS["gemma2-hd16"] = ("gemma2", {**CONFIGS["gemma2"][1], "head_dim": 16})
# Gemma 2 with its own lm_head (Gemma2Config ties by default; some fine-tunes untie): the head must be read.
CONFIGS["gemma2-untied"] = ("gemma2", {**CONFIGS["gemma2"][1], "tie_word_embeddings": False})
# More neurons than two chunks of the native step's dense FFN phase (stage_q_ffn_dense: 768): 1600 = 768 + 768 + 64,
# with the llama kind's MLP biases, and head_dim 32 so that o's 192 inputs take int4 blocks of 32.
CONFIGS["llama-ff1600"] = ("llama", {**CONFIGS["llama"][1], "head_dim": 32, "intermediate_size": 1600})
# head_dim 96 with GQA 4:1: the native attention's value rows in a 64-column pass then a 32-column one, four query
# heads sharing each key tile (the smaller head_dims above take only the 32-column path).
CONFIGS["llama-hd96"] = ("llama", {**CONFIGS["llama"][1], "num_attention_heads": 4, "num_key_value_heads": 1,
                                   "head_dim": 96})
# SmolLM2's attention shape: GQA 3:1, head_dim 64 (an fp16 cache's keys scored for three query heads at once).
CONFIGS["llama-hd64"] = ("llama", {**CONFIGS["llama"][1], "head_dim": 64})
SLIDING_KINDS = ("mistral", "qwen2", "gemma2")


def hf_attn_implementation(kind: str) -> str | None:
    """What a test should pass to from_pretrained: Gemma 2 soft-caps scores, which only `eager` implements."""
    return "eager" if CONFIGS[kind][0] == "gemma2" else None


def corpus_text(n_words: int = 600, seed: int = 0) -> str:
    """A few hundred words of deterministic pseudo-English to train the tokenizer and build prompts."""
    rng = random.Random(seed)
    subjects = ["the cat", "a small dog", "my friend", "the teacher", "our model", "every student", "the river",
                "a robot", "the old man", "this program", "the sun", "her brother"]
    verbs = ["sees", "likes", "builds", "reads", "counts", "follows", "paints", "writes", "finds", "moves",
             "computes", "remembers", "answers", "decodes"]
    objects = ["the red ball", "a long book", "three apples", "the quiet house", "many numbers", "a green tree",
               "the next token", "some cold water", "the final answer", "a bright star", "two blue boxes"]
    tails = ["today", "again", "slowly", "at night", "in the garden", "with care", "before lunch", "for fun",
             "without a word", "near the sea"]
    words: list[str] = []
    while len(words) < n_words:
        sentence = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(tails)}."
        if rng.random() < 0.3:
            sentence += f" It is {rng.randint(0, 99)} out of {rng.randint(100, 999)}!"
        words.extend(sentence.capitalize().split())
    return " ".join(words[:n_words])


def build_tokenizer():
    """A byte-level BPE tokenizer trained in code, wrapped as a transformers fast tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = corpus_text()
    tok.train_from_iterator([text[i:i + 200] for i in range(0, len(text), 200)], trainer=trainer)
    # BOS is prepended to plain (non-chat) encodes, as Llama tokenizers do.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", BOS_ID)])
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                   chat_template=CHAT_TEMPLATE)


def _randomize(model: torch.nn.Module, gemma: bool, seed: int) -> None:
    """Every parameter random: weights N(0, INIT_STD), biases N(0, 0.1), norm gains around their neutral value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name:  # Gemma stores w for (1 + w); the others store the gain itself
                p.copy_(0.2 * noise if gemma else 1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(INIT_STD * noise)


def make_config(kind: str):
    from transformers import CONFIG_MAPPING

    model_type, kwargs = CONFIGS[kind]
    return CONFIG_MAPPING[model_type](**{**_COMMON, **kwargs})


def make_tiny_model(kind: str, folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                    tokenizer: bool = True) -> Path:
    """Write a random `kind` model (one of KINDS) as a safetensors HF folder at `folder`; return the folder."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from transformers.utils import logging as hf_logging

    if kind not in CONFIGS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose from {', '.join(CONFIGS)}")
    hf_logging.disable_progress_bar()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = make_config(kind)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _randomize(model, gemma=cfg.model_type == "gemma2", seed=seed + 1000 * list(CONFIGS).index(kind))
    model = model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(folder, safe_serialization=True)
    # Two stop ids (</s> and <|im_end|>), as chat models ship them: the spec must read both.
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=[EOS_ID, IM_END_ID], pad_token_id=PAD_ID).save_pretrained(folder)
    if tokenizer:
        build_tokenizer().save_pretrained(folder)
    return folder


def read_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


if __name__ == "__main__":  # python tests/tiny_models.py OUT_DIR: write every kind, for poking at by hand
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny_models")
    for k in KINDS:
        print(make_tiny_model(k, out / k))
