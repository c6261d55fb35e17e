import pytest

from rlhf_dist.io.checkpoint import (
    CheckpointError,
    atomic_dir,
    complete_iterations,
    is_complete,
    mark_stage_finished,
    mark_stage_started,
    safe_join,
    stage_finished,
    verify,
)


def test_atomic_dir_seals_and_replaces(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("one")
    assert is_complete(final)
    verify(final)
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("two")
    assert (final / "a.txt").read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_failure_leaves_previous_and_no_temp(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("one")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "a.txt").write_text("partial")
            raise RuntimeError("killed")
    assert (final / "a.txt").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_disk_full_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*ckpt.*No space"):
        with atomic_dir(tmp_path / "ckpt"):
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_corruption_names_file_and_sums(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_dir(final) as tmp:
        (tmp / "w.bin").write_bytes(b"x" * 100)
    (final / "w.bin").write_bytes(b"x" * 50)
    with pytest.raises(CheckpointError, match=r"w.bin: sha256 mismatch: expected [0-9a-f]{64}, got [0-9a-f]{64}"):
        verify(final)


def test_incomplete_iterations_are_ignored(tmp_path, caplog):
    with atomic_dir(tmp_path / "iteration_000001") as tmp:
        (tmp / "s.json").write_text("{}")
    (tmp_path / "iteration_000002").mkdir()
    assert [p.name for p in complete_iterations(tmp_path)] == ["iteration_000001"]
    assert "ignoring incomplete checkpoint" in caplog.text


def test_safe_join_refuses_escapes(tmp_path):
    assert safe_join(tmp_path, "a", "b") == tmp_path / "a" / "b"
    for bad in ("../x", "/etc", "a/../../x"):
        with pytest.raises(CheckpointError):
            safe_join(tmp_path, bad)
    (tmp_path / "link").symlink_to("/tmp")
    with pytest.raises(CheckpointError, match="outside"):
        safe_join(tmp_path, "link", "x")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create `marker` if ever unpickled


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickled_weights_are_refused_and_never_run(tiny, tmp_path, monkeypatch, name):
    import pickle
    import shutil

    from rlhf_dist.models.load import ModelError, load_causal_lm, load_scalar_model

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    d = tmp_path / "evil"
    shutil.copytree(tiny["model"], d)
    (d / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (d / name).write_bytes(pickle.dumps(_Payload(str(marker))))
    for load in (load_causal_lm, load_scalar_model):
        with pytest.raises((ModelError, OSError)):
            load(str(d))
    assert not marker.exists()


def test_stale_temps_of_an_interrupted_save_are_removed(tmp_path):
    from rlhf_dist.io.checkpoint import remove_stale_temps

    (tmp_path / ".iteration_000004.tmp-1234abcd").mkdir()
    (tmp_path / ".iteration_000004.tmp-1234abcd" / "model.safetensors").write_bytes(b"x")
    (tmp_path / ".final_model.old-99").mkdir()
    (tmp_path / "iteration_000002").mkdir()
    removed = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == [".final_model.old-99", ".iteration_000004.tmp-1234abcd"]
    assert [p.name for p in tmp_path.iterdir()] == ["iteration_000002"]


def test_stage_outputs_cannot_leave_save_dir_through_a_symlink(tmp_path):
    """A `ppo` symlink planted in save_dir pointing elsewhere is refused before anything is written."""
    (tmp_path / "run").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "run" / "ppo").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="resolves outside"):
        safe_join(tmp_path / "run", "ppo")


def test_a_best_model_saved_mid_stage_is_not_a_finished_stage(tmp_path):
    """SFT and RM rewrite best_model at every better eval, so a complete best_model may come from an
    interrupted run. Only the marker written when the job has finished lets a rerun skip the stage."""
    best = tmp_path / "sft" / "best_model"
    with atomic_dir(best) as tmp:
        (tmp / "model.safetensors").write_bytes(b"x")
    assert is_complete(best) and not stage_finished(best)
    mark_stage_finished(best)
    assert stage_finished(best)
    mark_stage_started(best)  # an explicit rerun of the stage: a crash in it must not leave the old marker
    assert is_complete(best) and not stage_finished(best)
