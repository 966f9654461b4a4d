"""Tiny random checkpoints of every member family, built from configs (no download).

Each has 2 layers, hidden size 32 and a small byte-level BPE tokenizer trained
here on the built-in tables' text, so " yes" and " no" are single tokens the
way they are in real language-model vocabularies.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILY_OF = {"llama": "decoder", "qwen2": "decoder", "gpt2": "decoder", "t5": "encoder-decoder", "bert": "encoder"}
TINY_KINDS = tuple(FAMILY_OF)


def build_tiny_tokenizer(path: Path) -> Path:
    """A 600-token byte-level BPE tokenizer saved as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mlflow_tabcons.data.serialize import RowSerializer
    from mlflow_tabcons.data.tables import load_dataset

    corpus = []
    for name in ("credit-g", "diabetes"):
        dataset = load_dataset(name)
        serializer = RowSerializer(dataset.features, dataset.dictionary, dataset.question, answer_cue="Answer:")
        corpus += [f"{text} {answer}" for text in serializer.serialize_frame(dataset.frame.head(200)) for answer in ("yes", "no")]
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<pad>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return path


def build_tiny_checkpoint(kind: str, path: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """A randomly initialised ``kind`` model (llama, qwen2, gpt2, t5, bert) saved with the tiny tokenizer."""
    import transformers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab, pad = len(tokenizer), tokenizer.pad_token_id
    small = {"vocab_size": vocab, "pad_token_id": pad}
    configs = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)),
        "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=512)),
        "t5": ("T5Config", "T5ForConditionalGeneration", dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                                               decoder_start_token_id=pad)),
        "bert": ("BertConfig", "BertModel", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=64, max_position_embeddings=512)),
    }
    config_name, model_name, fields = configs[kind]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**small, **fields)
    getattr(transformers, model_name)(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
