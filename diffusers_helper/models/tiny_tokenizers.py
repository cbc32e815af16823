"""Byte-level BPE tokenizers for the tiny preset, learned from a small fixed corpus.

The real Llama-3 and CLIP tokenizers are large downloads; these have the same classes, special tokens and
prompt template behaviour, so the prompt-encoding code runs unchanged on them.
"""

from __future__ import annotations

from . import specs as model_specs

LLAMA_SPECIALS = {
    "bos": "<|begin_of_text|>",
    "eos": "<|end_of_text|>",
    "start_header": "<|start_header_id|>",
    "end_header": "<|end_header_id|>",
    "eot": "<|eot_id|>",
    "pad": "<pad>",
}
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
# transformers' CLIPTokenizer word split, reused so the learned merges fit how it splits text
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

# Small fixed corpus the tiny BPE merges are learned from; any text still tokenizes (byte-level).
_CORPUS = model_specs.PROMPT_TEMPLATE.replace("{}", "") + (
    " A cat walks on the grass, realistic. A dog runs in the park. The girl dances gracefully, with clear"
    " movements, full of charm. A man is talking to the camera in a room. The water flows over the rocks."
    " A car drives down the street at night, the lights reflect on the wet road. Slow motion, close up,"
    " cinematic lighting, high quality, the wind moves the trees and the clouds in the sky."
)



def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet of byte-level BPE)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _learn_merges(words: list[tuple[str, ...]], n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE with a total order on ties, so the vocabulary never depends on hash or thread order."""
    counts: dict[tuple[str, ...], int] = {}
    for w in words:
        if len(w) > 1:
            counts[w] = counts.get(w, 0) + 1
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: dict[tuple[str, str], int] = {}
        for w, c in counts.items():
            for pair in zip(w, w[1:]):
                pairs[pair] = pairs.get(pair, 0) + c
        if not pairs:
            break
        best, best_count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if best_count < 2:
            break
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for w, c in counts.items():
            out: list[str] = []
            i = 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + c
        counts = merged
    return merges


def build_llama_tokenizer(n_merges: int, max_length: int):
    """Llama-3-style byte-level BPE: BOS added by the post-processor, template markers as special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    text = _CORPUS
    for tok in LLAMA_SPECIALS.values():
        text = text.replace(tok, " ")
    words = [tuple(w) for w, _ in pre.pre_tokenize_str(text)]
    merges = _learn_merges(words, n_merges)
    # The template's "{}" placeholder is one token, as in Llama-3, so "template tokens - 2" (placeholder
    # and closing <|eot_id|>) is where the user prompt starts.
    if ("{", "}") not in merges:
        merges.append(("{", "}"))

    vocab: dict[str, int] = {}
    for ch in _bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))

    backend = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=False))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA_SPECIALS.values()])
    bos = LLAMA_SPECIALS["bos"]
    bos_id = backend.token_to_id(bos)
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=LLAMA_SPECIALS["eos"],
        pad_token=LLAMA_SPECIALS["pad"],
        padding_side="right",
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )


def build_clip_tokenizer(n_merges: int, max_length: int):
    """CLIP-style BPE (lowercase, `</w>` word ends) with the two specials last, as in CLIP-L's vocab."""
    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers import CLIPTokenizer

    norm = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(_CLIP_SPLIT),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    words = [tuple(w[:-1]) + (w[-1] + "</w>",) for w, _ in pre.pre_tokenize_str(norm.normalize_str(_CORPUS))]
    merges = _learn_merges(words, n_merges)

    vocab: dict[str, int] = {}
    chars = list(_bytes_to_unicode().values())
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    for ch in chars:
        vocab.setdefault(ch + "</w>", len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=max_length,
    )
