"""Write a small seed corpus for the cargo-fuzz targets to fuzz/corpus/<target>/ (not committed:
run this before `cargo fuzz run`). Seeds are valid files of each format plus a few near misses, so
the fuzzer starts inside the parsers instead of at "not valid JSON"."""

import base64
import json
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent


def byte_level_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table (the spelling of vocab.json / tokenizer.json)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


ALPHABET = byte_level_alphabet()
MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or")]


def vocab() -> dict[str, int]:
    v = {c: i for i, c in enumerate(ALPHABET)}
    for left, right in MERGES:
        v[left + right] = len(v)
    return v


def tokenizer_json(split: dict | None = None, added: list | None = None) -> bytes:
    pre = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if split is not None:
        pre = {"type": "Sequence", "pretokenizers": [split, {**pre, "use_regex": False}]}
    v = vocab()
    data = {
        "version": "1.0",
        "added_tokens": added
        if added is not None
        else [{"id": len(v), "content": "<|endoftext|>", "special": True, "single_word": False,
               "lstrip": False, "rstrip": False, "normalized": False}],
        "normalizer": None,
        "pre_tokenizer": pre,
        "post_processor": None,
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": v, "merges": [f"{a} {b}" for a, b in MERGES]},
    }
    return json.dumps(data).encode()


def safetensors(tokens: list[int], offsets: list[int], shape_delta: int = 0) -> bytes:
    tok = struct.pack(f"<{len(tokens)}H", *tokens)
    off = struct.pack(f"<{len(offsets)}Q", *offsets)
    header = {
        "__metadata__": {"format": "ferrolm-shard", "format_version": "1", "split": "train"},
        "tokens": {"dtype": "U16", "shape": [len(tokens) + shape_delta], "data_offsets": [0, len(tok)]},
        "doc_offsets": {"dtype": "U64", "shape": [len(offsets)], "data_offsets": [len(tok), len(tok) + len(off)]},
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + tok + off


def manifest(**change) -> bytes:
    shard = {"file": "train-00000.safetensors", "tokens": 4, "documents": 1, "bytes": 200, "sha256": "ab" * 32}
    data = {
        "format": "ferrolm-shards", "format_version": 1, "created_by": "ferrolm 0.1.0",
        "tokenizer": {"file": "tokenizer.json", "sha256": "cd" * 32},
        "vocab_size": 263, "dtype": "uint16", "bos_id": None, "eos_id": 262, "seed": 0, "val_fraction": 0.0,
        "shard_tokens": 1000, "total_tokens": 4, "total_documents": 1, "documents_read": 1, "input_bytes": 10,
        "splits": {"train": {"tokens": 4, "documents": 1, "shards": [shard]},
                   "val": {"tokens": 0, "documents": 0, "shards": []}},
        "inputs": [{"path": "d.jsonl", "documents": 1, "bytes": 10}],
        "skipped": {"empty_documents": 0, "bad_lines": 0, "invalid_utf8_replaced": 0},
    }
    data.update(change)
    return json.dumps(data).encode()


def progress() -> bytes:
    return json.dumps({
        "tokenizer_sha256": "cd" * 32, "options": "val_fraction=0 shard_tokens=1000",
        "inputs": [{"path": "d.jsonl", "size": 10, "mtime_ns": 1, "consumed_bytes": 10, "consumed_sha256": "ef" * 32}],
        "shards": {"train": []},
    }).encode()


def main() -> None:
    v = vocab()
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES)
    ranks = "".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256))
    ranks += f"{base64.b64encode(b'he').decode()} 256\n{base64.b64encode(b'll').decode()} 257\n"
    seeds = {
        "tokenizer_json": {
            "plain": tokenizer_json(),
            "split_removed": tokenizer_json({"type": "Split", "pattern": {"String": " "}, "behavior": "Removed", "invert": False}),
            "split_regex": tokenizer_json({"type": "Split", "pattern": {"Regex": "[a-z]+"}, "behavior": "Isolated", "invert": True}),
            "special_clash": tokenizer_json(added=[{"id": 5, "content": "<x>", "special": True}]),
            "huge_id": tokenizer_json(added=[{"id": 4294967294, "content": "<x>", "special": True}]),
        },
        "vocab_merges": {
            "full": json.dumps(v).encode() + b"\0" + merges_txt.encode(),
            "truncated": json.dumps(v).encode() + b"\0" + merges_txt.encode()[:-10],
            "encoder_bpe": json.dumps({**v, "<|endoftext|>": len(v)}).encode() + b"\0" + merges_txt.encode(),
        },
        "tiktoken": {"ranks": ranks.encode(), "dup": (ranks + "aA== 3\n").encode(), "gap": ranks.replace(" 7\n", " 700\n").encode()},
        "shard_header": {
            "good": safetensors([1, 2, 3, 262], [0, 4]),
            "bad_shape": safetensors([1, 2, 3, 262], [0, 4], shape_delta=1),
            "short": safetensors([1, 2], [0, 2])[:20],
        },
        "manifest": {
            "good": manifest(),
            "dup_shard": manifest(splits={"train": {"tokens": 8, "documents": 2, "shards": [json.loads(manifest())["splits"]["train"]["shards"][0]] * 2}}),
            "path": manifest(tokenizer={"file": "../t.json", "sha256": "cd" * 32}),
            "progress": progress(),
        },
    }
    for target, files in seeds.items():
        out = HERE / "corpus" / target
        out.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (out / name).write_bytes(data)
        print(f"{target}: {len(files)} seeds -> {out}")


if __name__ == "__main__":
    main()
