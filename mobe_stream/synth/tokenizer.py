"""A real, working byte-level BPE tokenizer.json trained offline on a small built-in text."""

from __future__ import annotations

from pathlib import Path

TEXT = """Mixture-of-Experts models route every token to a few experts out of many. The experts of a
layer look alike: they share structure that a few bases can hold. Basis experts are mixed with
learned weights and passed through an activation, and each expert keeps its own small transform.
The quick brown fox jumps over the lazy dog. A model that does not fit in memory is read layer by
layer from the disk, compressed on the accelerator and written back in shards that can be resumed.
""" * 4

SPECIALS = ["<unk>", "<|bos|>", "<|eos|>"]


def write_tokenizer(out_dir: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 400), special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT.splitlines(), trainer=trainer)
    tok.save(str(Path(out_dir) / "tokenizer.json"))
    (Path(out_dir) / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>", '
        '"unk_token": "<unk>", "model_max_length": 1024}\n')
