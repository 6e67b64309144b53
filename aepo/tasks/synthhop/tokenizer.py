"""SynthHop's tokenizer: WordPiece over an explicit vocabulary (nothing is trained).

Whole words are the fixed text's words and punctuation; a name is split into its syllables,
each a word-initial piece ("ko") or a continuation piece ("##ra"). Every syllable occurs in
training names, so held-out names are sequences of trained tokens and answering one is copying
a span. Tool tags and the newline are added, non-special tokens: they survive
``skip_special_tokens=True`` decoding (vLLM's default) and stop strings match them.

Round trip: ``decode(encode(x), skip_special_tokens=True) == x`` for text in SynthHop's
convention (lower-case words separated by single spaces, natural punctuation, no space next to
a newline), which covers every document, prompt, tool output and gold response. The WordPiece
decoder joins tokens with spaces and "##" pieces without; literal replacements then take the
space off before ``. , ? : )`` and a newline and after ``(`` and a newline. Each replacement
touches only the space in front of the newest token, so decoding a growing sequence only ever
appends (incremental detokenizers such as ``tokenizers.decoders.DecodeStream`` rely on it).
The rollout's result wrapper ``"\\n<result>\\n"`` is three tokens: ``\\n``, ``<result>``,
``\\n``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aepo.models import SPECIAL, TAGS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from aepo.tasks.synthhop.kb import SynthHop

UNK = "[UNK]"
CONTINUATION = "##"
NEWLINE = "\n"
# (pattern, replacement) applied in order to the fused WordPiece output.
DECODE_RULES = (
    (" .", "."),
    (" ,", ","),
    (" ?", "?"),
    (" :", ":"),
    (" )", ")"),
    ("( ", "("),
    (" \n", "\n"),
    ("\n ", "\n"),
)


def vocabulary(kb: SynthHop) -> list[str]:
    """Special tokens, then whole words, then word-initial and continuation syllables (the
    WordPiece vocabulary; tags and the newline are added on top)."""
    syllables = list(kb.syllable_inventory)
    words = [w for w in kb.words() if w not in syllables]
    return [*SPECIAL.values(), UNK, *words, *syllables, *(CONTINUATION + s for s in syllables)]


def build_tokenizer(kb: SynthHop) -> PreTrainedTokenizerFast:
    """The ``PreTrainedTokenizerFast`` for ``kb``'s text: WordPiece, BERT pre-tokenization (split
    on whitespace and punctuation), no normalisation (case is kept: the tool writes "Doc 1"),
    ``<|bos|>`` prepended when ``add_special_tokens`` (the default)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary(kb)
    if len(set(vocab)) != len(vocab):
        raise ValueError("duplicate vocabulary entries")
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.Sequence(
        [decoders.WordPiece(prefix=CONTINUATION, cleanup=False), decoders.Fuse()]
        + [decoders.Replace(pattern, content) for pattern, content in DECODE_RULES]
    )
    tok.add_special_tokens([AddedToken(t, special=True) for t in (*SPECIAL.values(), UNK)])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in (*TAGS, NEWLINE)])
    bos = SPECIAL["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab.index(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=UNK, clean_up_tokenization_spaces=False, **SPECIAL
    )
