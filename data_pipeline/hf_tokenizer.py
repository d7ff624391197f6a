"""Our tokenizers as Hugging Face tokenizer directories, for `sf-convert to-hf`.

`transformers.AutoTokenizer.from_pretrained(out)` then encodes text to the ids ours gives
(without special tokens: `add_special_tokens` adds none) and knows the BOS, EOS, UNK and PAD
tokens. A sentencepiece BPE model becomes a `tokenizers` BPE whose merges are ranked by the
merged piece's score, which is the order sentencepiece merges in (transformers' own
sentencepiece conversion builds a Unigram model, which splits differently); the normalizer,
pre-tokenizer and decoder are transformers' (SpmConverter). A Hugging Face tokenizer.json
is written as it is. Needs `transformers` and `tokenizers` (the `hf` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from scaleforge.data_pipeline.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer

if TYPE_CHECKING:
    from tokenizers import Tokenizer as RustTokenizer

_SPM_BPE = 2  # sentencepiece's ModelProto.TrainerSpec.model_type of BPE
_SPM_NORMAL = 1  # sentencepiece's piece type of an ordinary (mergeable) piece


def export_hf_tokenizer(tokenizer: Tokenizer, out: Path) -> Path:
    """Write `tokenizer` as tokenizer.json + tokenizer_config.json into `out`; return out."""
    from tokenizers import Tokenizer as RustTokenizer  # noqa: F811 (the runtime import)
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, HFTokenizer):
        backend = RustTokenizer.from_file(str(tokenizer.path))
    elif isinstance(tokenizer, SentencePieceTokenizer):
        backend = _from_sentencepiece(tokenizer.path)
    else:
        raise TypeError(f"cannot export a {type(tokenizer).__name__}")
    special = {}
    for name, token_id in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id),
                           ("pad_token", tokenizer.pad_id)):
        if token_id >= 0:
            special[name] = backend.id_to_token(token_id)
    if isinstance(tokenizer, SentencePieceTokenizer):
        special["unk_token"] = backend.id_to_token(0)
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out


def _from_sentencepiece(model_path: Path) -> RustTokenizer:
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    if proto.trainer_spec.model_type != _SPM_BPE:
        return backend
    ids = {piece: index for index, (piece, _) in enumerate(vocab)}
    ranked = []
    for index, piece in enumerate(proto.pieces):
        if piece.type != _SPM_NORMAL:
            continue
        for cut in range(1, len(piece.piece)):
            left, right = piece.piece[:cut], piece.piece[cut:]
            if left in ids and right in ids:
                ranked.append((-piece.score, index, (left, right)))
    merges = [pair for *_, pair in sorted(ranked)]
    backend.model = BPE(vocab=ids, merges=merges, unk_token=proto.trainer_spec.unk_piece,
                        byte_fallback=proto.trainer_spec.byte_fallback, fuse_unk=True)
    return backend
