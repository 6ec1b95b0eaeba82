"""Prompt readers on synthetic files: line endings, COCO captions, and errors naming file + line/record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from t2i_align.datamodules import PromptFileError, read_prompts


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def test_txt_bom_crlf_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "p.txt", b"\xef\xbb\xbfa cat\r\n\r\n  a dog \t\r\n\na cow")
    prompts = read_prompts(path)
    assert [(p.text, p.id, p.source) for p in prompts] == [
        ("a cat", "0", "p"),
        ("a dog", "1", "p"),
        ("a cow", "2", "p"),
    ]


def test_coco_captions_json(tmp_path: Path) -> None:
    coco = {
        "images": [{"id": 7, "file_name": "a.jpg"}, {"id": 9, "file_name": "b.jpg"}],
        "annotations": [
            {"id": 100, "image_id": 9, "caption": "A dog.\n"},
            {"id": 101, "image_id": 7, "caption": "A cat."},
        ],
    }
    path = write(tmp_path / "captions_val2014.json", json.dumps(coco))
    prompts = read_prompts(path, source="coco")
    assert [(p.id, p.text, p.meta) for p in prompts] == [
        ("100", "A dog.", {"image_id": 9, "file_name": "b.jpg"}),
        ("101", "A cat.", {"image_id": 7, "file_name": "a.jpg"}),
    ]
    coco["annotations"].append({"id": 102, "image_id": 3, "caption": "x"})
    write(path, json.dumps(coco))
    with pytest.raises(PromptFileError, match=r"annotation id 102.*image_id 3"):
        read_prompts(path)


@pytest.mark.parametrize(
    ("name", "content", "fmt", "pattern"),
    [
        ("bad.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c"\n', "auto", r"line 3.*invalid JSON"),
        ("nokey.jsonl", '{"prompt": "a"}\n\n{"caption_x": "b"}\n', "auto", r"line 3.*exactly one prompt key"),
        ("both.jsonl", '{"prompt": "a", "text": "b"}\n', "auto", r"line 1.*several: prompt, text"),
        ("array.jsonl", '{"prompt": "a"}\n[1, 2]\n', "auto", r"line 2.*expected a JSON object"),
        ("emptytext.jsonl", '{"prompt": "a"}\n{"prompt": "  "}\n', "auto", r"line 2.*empty prompt"),
        ("dup.jsonl", '{"prompt": "a", "id": 1}\n{"prompt": "b", "id": "1"}\n', "auto", r"duplicate id '1'"),
        (
            "list.json",
            '[{"prompt": "a"}, {"caption_x": "b"}]',
            "json",
            r"record index 1.*exactly one prompt key",
        ),
        ("syntax.json", '[\n{"prompt": "a"},\n{"prompt": }\n]', "auto", r"line 3.*invalid JSON"),
        (
            "tifa.json",
            '[{"id": "x", "caption": "a"}, {"caption": "b"}]',
            "tifa",
            r"record index 1.*missing id key 'id'",
        ),
        ("ambiguous.json", '[{"prompt": "a", "caption": "b"}]', "auto", r"cannot tell the prompt key"),
        ("dict.json", '{"a": 1}', "auto", r"unrecognised JSON layout"),
        ("nocol.csv", "Prompts\nA car.\n", "drawbench", r"line 1 \(header\).*missing column.*Category"),
        ("noprompt.csv", "name,category\nx,y\n", "auto", r"line 1 \(header\).*exactly one prompt column"),
        (
            "fields.csv",
            'prompt,cat\r\n"a\r\nwrapped",x\r\nb,y,z\r\n',
            "auto",
            r"line 4.*expected 2 fields.*got 3",
        ),
        ("quote.csv", 'prompt,cat\na,x\n"b"c,y\n', "auto", r"line 3.*malformed CSV"),
        ("emptycell.csv", "Prompts,Category\nA car.,Colors\n ,Colors\n", "auto", r"line 3.*empty prompt"),
        ("prompts.yaml", "- a\n", "auto", r"cannot infer the prompt format"),
        ("empty.txt", "\r\n \n", "auto", r"no prompts found"),
        ("empty.jsonl", "", "auto", r"no prompts found"),
        ("empty.json", "  ", "auto", r"file is empty"),
        ("emptylist.json", "[]", "json", r"no prompts found"),
        ("empty.csv", "", "csv", r"exactly one prompt column"),
        ("header_only.csv", "prompt,x\n", "csv", r"no prompts found"),
    ],
)
def test_malformed_files_name_file_and_line(
    tmp_path: Path, name: str, content: str, fmt: str, pattern: str
) -> None:
    path = write(tmp_path / name, content)
    with pytest.raises(PromptFileError, match=pattern) as info:
        read_prompts(path, format=fmt)
    assert str(path) in str(info.value)


def test_not_utf8(tmp_path: Path) -> None:
    path = write(tmp_path / "latin1.txt", "a caf\u00e9\n".encode("latin-1"))
    with pytest.raises(PromptFileError, match=r"not UTF-8 text \(byte 5") as info:
        read_prompts(path)
    assert str(path) in str(info.value)


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(PromptFileError, match="file not found") as info:
        read_prompts(tmp_path / "nope.txt")
    assert str(tmp_path / "nope.txt") in str(info.value)
    with pytest.raises(PromptFileError, match="file not found"):
        read_prompts(tmp_path / "nope.txt", format="txt")
    with pytest.raises(ValueError, match="unknown prompt format 'xml'"):
        read_prompts(write(tmp_path / "a.txt", "a"), format="xml")


def test_prompt_folder_errors(tmp_path: Path) -> None:
    folder = tmp_path / "prompts"
    write(folder / "10.txt", "ten")
    write(folder / "2.txt", "two\r\n")
    assert [(p.id, p.text, p.source) for p in read_prompts(folder)] == [
        ("2", "two", "prompts"),
        ("10", "ten", "prompts"),
    ]
    bad = write(folder / "3.txt", "first\nsecond")
    with pytest.raises(PromptFileError, match="exactly one non-empty line") as info:
        read_prompts(folder)
    assert str(bad) in str(info.value)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(PromptFileError, match="no prompts found"):
        read_prompts(tmp_path / "empty_dir")
