"""Checkpoint behaviour the mutation run (make mutation) found untested."""
from training.checkpoint import CheckpointDir


def test_remove_leftovers_deletes_only_killed_saves_folders_and_files(tmp_path):
    root = tmp_path / "checkpoints"
    kept = CheckpointDir(root, keep=3).write(2, lambda folder: (folder / "weights.bin").write_bytes(b"w"))
    (root / ".step_00000004.abc").mkdir()
    (root / ".step_00000004.abc" / "part").write_bytes(b"half")
    (root / ".step_00000006.tmp").write_bytes(b"half-written file")
    (root / "notes.txt").write_text("not ours")

    removed = CheckpointDir(root, keep=3).remove_leftovers()

    assert [p.name for p in removed] == [".step_00000004.abc", ".step_00000006.tmp"]
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt", kept.name]
    assert (kept / "weights.bin").read_bytes() == b"w"
    assert CheckpointDir(root, keep=3).remove_leftovers() == []
    assert CheckpointDir(tmp_path / "absent", keep=3).remove_leftovers() == []
