"""Damage is named, and nothing a user made is deleted or overwritten: damaged checkpoints,
records and histories stop a rerun before any work with the file and the way out; the
table builder lists unreadable records instead of failing; resume=false and the evaluator
move or refuse instead of overwriting."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from capsnet.reporting.table import main as table_main
from capsnet.run.rundir import SUPERSEDED_DIR, DamagedFileError, load_checkpoint_file
from capsnet.run.training import run
from conftest import SMALL_RUN, run_cli

pytestmark = pytest.mark.faults

SMALL = [*SMALL_RUN, "trainer.max_epochs=2"]


def _unfinished(make_cfg, run_dir: Path, step: int = 3) -> dict:
    """A run that crashed at the start of training step ``step`` (last.ckpt every 2 steps and
    at the end of epoch 0, step 4: failing at step 5 leaves last.ckpt and last.prev.ckpt)."""
    crash = ["+callbacks.crash._target_=apps.probes.FailAt", f"+callbacks.crash.step={step}"]
    record = run(make_cfg(*SMALL, *crash, output_dir=run_dir))
    assert record["status"] == "failed"
    return record


def _tensor_offset(path: Path) -> int:
    """The byte offset of the largest tensor's data inside a checkpoint's zip archive."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with path.open("rb") as handle:
        handle.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(handle.read(2), "little"), int.from_bytes(handle.read(2), "little")
    return info.header_offset + 30 + name_len + extra_len + info.file_size // 2


def test_a_truncated_last_checkpoint_is_named_with_the_way_out_and_nothing_is_written(
    make_cfg, tmp_path: Path, mnist_dir: Path
) -> None:
    run_dir = tmp_path / "run"
    _unfinished(make_cfg, run_dir, step=5)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.with_name("last.prev.ckpt").is_file()
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != "run.lock"}
    with pytest.raises(DamagedFileError, match=r"last\.ckpt is damaged: not a readable checkpoint.*last\.prev\.ckpt"):
        run(make_cfg(*SMALL, output_dir=run_dir))
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != "run.lock"}
    assert after == before, "a refused run changed the run dir"
    # the CLI: exit 2, the file named, and the way out works: the kept previous checkpoint
    args = [
        "profile=smoke",
        "logger=none",
        "trainer=cpu",
        *SMALL,
        f"paths.data_dir={mnist_dir}",
        f"hydra.run.dir={run_dir}",
    ]
    refused = run_cli("train.py", *args)
    assert refused.returncode == 2 and f"{last} is damaged" in refused.stderr and "resume=false" in refused.stderr
    (run_dir / "checkpoints" / "last.prev.ckpt").replace(last)
    resumed = run_cli("train.py", *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"


def test_altered_bytes_inside_a_checkpoint_are_caught_by_its_checksum(make_cfg, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _unfinished(make_cfg, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    load_checkpoint_file(last)  # intact: loads and verifies
    data = bytearray(last.read_bytes())
    offset = _tensor_offset(last)
    data[offset : offset + 16] = bytes(255 - b for b in data[offset : offset + 16])
    last.write_bytes(bytes(data))
    with pytest.raises(DamagedFileError, match=r"do not match their checksum"):
        load_checkpoint_file(last)
    with pytest.raises(DamagedFileError, match=r"last\.ckpt is damaged: its tensors do not match their checksum"):
        run(make_cfg(*SMALL, output_dir=run_dir))


def test_a_completed_run_with_a_damaged_last_checkpoint_is_still_skipped(make_cfg, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = make_cfg(*SMALL, output_dir=run_dir)
    first = run(cfg)
    assert first["status"] == "completed"
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"\0" * 100)
    assert run(make_cfg(*SMALL, output_dir=run_dir)) == first


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("history.csv", "epoch,step\n0,zzz\n", r"history\.csv is damaged: not a history table.*Move it aside"),
        ("history.csv", "\x00\x01garbage\n1,2\n", r"history\.csv is damaged: its header has no epoch and step"),
        ("metrics.json", '{"status": "comp', r"metrics\.json is damaged: not valid JSON.*Move it aside"),
    ],
)
def test_a_damaged_history_or_record_is_named_before_any_work(
    name: str, content: str, message: str, make_cfg, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    _unfinished(make_cfg, run_dir)
    (run_dir / name).write_text(content)
    step_before = load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    with pytest.raises(DamagedFileError, match=message):
        run(make_cfg(*SMALL, output_dir=run_dir))
    assert (run_dir / name).read_text() == content
    assert load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")["global_step"] == step_before


def test_the_table_lists_an_unreadable_record_instead_of_failing(make_cfg, tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "sweep"
    assert run(make_cfg(*SMALL, "trainer.max_epochs=1", output_dir=sweep / "good"))["status"] == "completed"
    (sweep / "bad").mkdir()
    (sweep / "bad" / "metrics.json").write_text("{not json")
    table_main([str(sweep), "--out", str(tmp_path / "out")])
    text = (tmp_path / "out" / "table1.md").read_text()
    assert "## Runs not in the table" in text and "bad` (unreadable)" in text and "not valid JSON" in text
    assert "(n=1)" in text  # the good run is counted


def test_the_table_never_writes_an_empty_table_over_one_nor_deletes_report_files(
    make_cfg, tmp_path: Path, capsys
) -> None:
    sweep, out = tmp_path / "sweep", tmp_path / "out"
    assert run(make_cfg(*SMALL, "trainer.max_epochs=1", output_dir=sweep / "good"))["status"] == "completed"
    (out / "report").mkdir(parents=True)
    (out / "report" / "my_notes.txt").write_text("mine")
    table_main([str(sweep), "--out", str(out), "--report"])
    table = (out / "table1.md").read_text()
    assert (out / "report" / "my_notes.txt").read_text() == "mine" and (out / "REPORT.md").is_file()
    with pytest.raises(SystemExit) as exit_info:
        table_main([str(tmp_path / "typo"), "--out", str(out)])
    assert exit_info.value.code == 2 and "an empty table is not written over it" in capsys.readouterr().err
    assert (out / "table1.md").read_text() == table


def test_resume_false_moves_the_old_run_aside_so_an_interrupted_retrain_resumes(
    make_cfg, tmp_path: Path, mnist_dir: Path
) -> None:
    run_dir = tmp_path / "run"
    first = run(make_cfg(*SMALL, output_dir=run_dir))
    assert first["status"] == "completed"
    crash = ["+callbacks.crash._target_=apps.probes.FailAt", "+callbacks.crash.step=3"]
    retrain = run(make_cfg(*SMALL, *crash, "resume=false", output_dir=run_dir))
    assert retrain["status"] == "failed"  # the retrain was cut short
    (old,) = (run_dir / SUPERSEDED_DIR).iterdir()
    assert json.loads((old / "metrics.json").read_text()) == json.loads(json.dumps(first))
    assert (old / "checkpoints" / "best.ckpt").is_file()  # nothing of the old run deleted
    again = run(make_cfg(*SMALL, output_dir=run_dir))  # the plain command: resumes the retrain, no skip
    assert again["status"] == "completed" and "resumed_from" in again
    # the record describes the weights on disk: evaluating best.ckpt gives the recorded test error
    out = tmp_path / "eval"
    result = run_cli(
        "eval.py", f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}", "data.test_subset=32", "trainer=cpu",
        f"paths.data_dir={mnist_dir}", f"hydra.run.dir={out}", "figures=false",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "metrics.json").read_text())["test_error"] == again["test_error"]


def test_eval_never_writes_over_a_training_record(make_cfg, tmp_path: Path, mnist_dir: Path) -> None:
    run_dir = tmp_path / "run"
    record = run(make_cfg(*SMALL, "trainer.max_epochs=1", output_dir=run_dir))
    before = (run_dir / "metrics.json").read_text()
    result = run_cli(
        "eval.py", f"ckpt_path={record['best_checkpoint']}", "trainer=cpu", f"paths.data_dir={mnist_dir}",
        f"hydra.run.dir={run_dir}", "figures=false",
    )  # fmt: skip
    assert result.returncode == 2 and "holds a training run's record" in result.stderr
    assert (run_dir / "metrics.json").read_text() == before


@pytest.mark.parametrize(
    ("override", "key"), [("seed=-4", "seed"), ("+ckpt=1", "ckpt"), ("data.batch_size=0", "data.batch_size")]
)
def test_eval_checks_its_config_before_any_work(override: str, key: str, tmp_path: Path, mnist_dir: Path) -> None:
    out = tmp_path / "eval"
    result = run_cli("eval.py", "ckpt_path=x.ckpt", override, f"paths.data_dir={mnist_dir}", f"hydra.run.dir={out}")
    assert result.returncode == 2 and f"invalid config value {key}=" in result.stderr, result.stderr[-2000:]
    assert not out.exists()
