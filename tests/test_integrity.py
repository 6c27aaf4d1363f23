"""What a kill, a bad disk or a user's file can leave behind: checkpoints verified against their
manifests (resume falls back to the newest that verifies), model directories checked before any
training, data files read with bounded lines, a quarantine and an error budget."""
import json
import logging
import os

import pytest
import torch
from safetensors.torch import save_file
from test_training import MICRO, _weights

from r1core import checkpoint as ckpt
from r1core.config import PretrainConfig
from r1core.modeling import build_model
from r1core.problems import pretraining_corpus
from r1core.training import TrainContext, pack, pretrain
from r1core.validation import MAX_LINE_BYTES, DataError, read_data_file, read_jsonl_checked


def _written(tmp_path, files: dict[str, bytes]):
    def write(d):
        for name, data in files.items():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_bytes(data)

    return ckpt.write_atomically(tmp_path / "step_000001", write, {"step": 1})


# ------------------------------------------------------------------------------------ manifests
@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "extend", "manifest", "manifest-garbage"])
def test_a_damaged_checkpoint_fails_verification_naming_the_file(tmp_path, damage):
    path = _written(tmp_path, {"model.bin": os.urandom(4096), "sub/optim.bin": b"x" * 1000})
    assert ckpt.verify(path) is None
    target = path / "sub" / "optim.bin"
    if damage == "truncate":
        target.write_bytes(b"x" * 999)
    elif damage == "flip":  # same size, one byte different: only the hash sees it
        target.write_bytes(b"x" * 999 + b"y")
    elif damage == "delete":
        target.unlink()
    elif damage == "extend":
        target.write_bytes(b"x" * 1001)
    elif damage == "manifest":
        (path / ckpt.MANIFEST).unlink()
    else:
        (path / ckpt.MANIFEST).write_text('{"files": [1, 2')
    problem = ckpt.verify(path)
    assert problem is not None
    assert ("optim.bin" in problem) if damage not in ("manifest", "manifest-garbage") else (ckpt.MANIFEST in problem)


@pytest.fixture(scope="module")
def blocks(rows, tokenizer):
    return pack(tokenizer, pretraining_corpus(rows[0], PretrainConfig(corpus_docs=300), seed=0), 64)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_state"])
def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(tokenizer, blocks, tmp_path, damage, caplog):
    """Checkpoints at steps 2 and 4; the newest is damaged: resume starts from step 2, says why,
    and the run ends with the weights of an undamaged one."""
    cfg = PretrainConfig(steps=6, batch_size=4, lr=3e-3, warmup_steps=2, checkpoint_every=2, seq_len=64, log_every=1)
    straight = build_model(MICRO, tokenizer, seed=1)
    pretrain(cfg, straight, blocks, TrainContext(tmp_path / "a"), seed=0)

    partial = PretrainConfig(**{**cfg.model_dump(), "steps": 4})
    pretrain(partial, build_model(MICRO, tokenizer, seed=1), blocks, TrainContext(tmp_path / "b"), seed=0)
    newest = ckpt.complete_checkpoints(tmp_path / "b")[0]
    assert newest.name == "step_000004"
    victim = max((f for f in newest.rglob("*") if f.is_file() and f.name not in (ckpt.MANIFEST, ckpt.COMPLETE)),
                 key=lambda f: f.stat().st_size)
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    elif damage == "flip":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    else:
        (newest / ckpt.TRAINER_STATE).unlink()

    resumed = build_model(MICRO, tokenizer, seed=2)
    ctx = TrainContext(tmp_path / "b")
    with caplog.at_level(logging.WARNING, logger="r1.train"):
        pretrain(cfg, resumed, blocks, ctx, seed=0)
    assert [s for s, _ in ctx.history][0] == 3  # steps 3.. after the checkpoint of step 2
    assert any("step_000004" in r.getMessage() and "not used" in r.getMessage() for r in caplog.records)
    for k, v in _weights(straight).items():
        assert torch.equal(v, resumed.state_dict()[k]), k


# ---------------------------------------------------------------------------- model directories
def _model_dir(tmp_path, tokenizer):
    model = build_model(MICRO, tokenizer, seed=0)
    out = tmp_path / "model"
    model.save_pretrained(out)
    return out


def test_check_model_dir_accepts_a_saved_model_and_names_each_defect(tmp_path, tokenizer):
    good = _model_dir(tmp_path, tokenizer)
    assert ckpt.check_model_dir(good) is None
    weights = good / "model.safetensors"
    data = weights.read_bytes()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "config.json" in ckpt.check_model_dir(empty)
    assert "no such directory" in ckpt.check_model_dir(tmp_path / "nope")
    (empty / "config.json").write_text("{not json")
    assert "config.json" in ckpt.check_model_dir(empty)
    (empty / "config.json").write_text("{}")
    assert "no weights" in ckpt.check_model_dir(empty)

    for cut in (0, 5, 8, 100, len(data) // 2, len(data) - 1):
        weights.write_bytes(data[:cut])
        problem = ckpt.check_model_dir(good)
        assert problem is not None and "model.safetensors" in problem, cut
    weights.write_bytes(data + b"\0")  # trailing bytes: not what the header describes
    assert "model.safetensors" in ckpt.check_model_dir(good)
    weights.write_bytes(b"\xff" * 8 + data[8:])  # an absurd header length
    assert "header" in ckpt.check_model_dir(good)
    header_len = int.from_bytes(data[:8], "little")
    weights.write_bytes(data[:8] + b"{" * header_len + data[8 + header_len:])  # a header that is not JSON
    assert "damaged header" in ckpt.check_model_dir(good)


def test_safetensors_check_agrees_with_safetensors_on_random_cuts(tmp_path):
    """Fuzz: every truncation of a multi-tensor file is caught by the header check."""
    from safetensors import safe_open

    f = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(7, 3), "b": torch.arange(11), "c": torch.zeros(0)}, str(f))
    data = f.read_bytes()
    assert ckpt.safetensors_problem(f) is None
    with safe_open(str(f), "pt") as st:
        assert set(st.keys()) == {"a", "b", "c"}
    gen = torch.Generator().manual_seed(0)
    for cut in torch.randint(0, len(data), (40,), generator=gen).tolist():
        f.write_bytes(data[:cut])
        assert ckpt.safetensors_problem(f) is not None, cut


# ---------------------------------------------------------------------------------- data files
ROW = {"prompt": "What is 2+3?", "answer": "5", "task": "chain_sum"}


def _jsonl(path, lines: list[bytes]):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def test_a_line_longer_than_the_bound_is_quarantined_unread(tmp_path):
    big = json.dumps({**ROW, "prompt": "x" * (MAX_LINE_BYTES + 10)}).encode()
    path = _jsonl(tmp_path / "rows.jsonl", [json.dumps(ROW).encode(), big, json.dumps(ROW).encode()])
    good, bad = read_jsonl_checked(path)
    assert len(good) == 2 and [b["line"] for b in bad] == [2] and "longer than" in bad[0]["reason"]
    assert bad[0]["raw"] == ""  # never loaded whole


@pytest.mark.parametrize("lines, message", [
    ([], "no usable rows"),
    ([b"   ", b""], "no usable rows"),
    ([b"not json at all"], "no usable rows"),
    ([b"\xff\xfe\x00garbage"], "no usable rows"),
    ([b'{"prompt": 3, "answer": "5", "task": "chain_sum"}'], "no usable rows"),
    ([json.dumps(ROW).encode(), b"{bad"], "error budget"),
    ([json.dumps(ROW).encode(), "{\"prompt\": \"Сколько\"}".encode()], "error budget"),
])
def test_unusable_data_files_are_errors_naming_field_and_file(tmp_path, lines, message):
    path = _jsonl(tmp_path / "train.jsonl", lines)
    with pytest.raises(DataError) as err:
        read_data_file(path, "data.train_file", error_budget=0.01)
    assert "data.train_file" in str(err.value) and str(path) in str(err.value) and message in str(err.value)


def test_bad_rows_within_the_budget_are_set_aside(tmp_path):
    lines = [json.dumps({**ROW, "prompt": f"What is {i}+1?"}).encode() for i in range(9)] + [b"[1, 2]"]
    good, bad = read_data_file(_jsonl(tmp_path / "train.jsonl", lines), "data.train_file", error_budget=0.1)
    assert len(good) == 9 and [b["line"] for b in bad] == [10]
    with pytest.raises(DataError, match="error budget"):
        read_data_file(tmp_path / "train.jsonl", "data.train_file", error_budget=0.05)


def test_a_parquet_file_that_is_not_one_is_an_error_naming_it(tmp_path):
    path = tmp_path / "rows.parquet"
    path.write_bytes(b"PAR1 but not really")
    with pytest.raises(DataError, match="rows.parquet"):
        read_data_file(path, "data.heldout_file", error_budget=0.0)
