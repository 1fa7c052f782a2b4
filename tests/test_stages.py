from __future__ import annotations

import json
import os
import stat

import pytest

from chemmap.stages import files_key, stable_hash, stage_dir


def test_key_depends_on_config_and_inputs_not_dict_order(tmp_path):
    a = stage_dir(tmp_path, "s", {"x": 1, "y": [1, 2]}, ["in1"])
    b = stage_dir(tmp_path, "s", {"y": [1, 2], "x": 1}, ["in1"])
    assert a.path == b.path
    assert stage_dir(tmp_path, "s", {"x": 2, "y": [1, 2]}, ["in1"]).key != a.key
    assert stage_dir(tmp_path, "s", {"x": 1, "y": [1, 2]}, ["in2"]).key != a.key
    assert stage_dir(tmp_path, "t", {"x": 1, "y": [1, 2]}, ["in1"]).key != a.key
    assert stable_hash({"a": 1}) == stable_hash({"a": 1})


def test_marker_is_written_last_and_completes_the_stage(tmp_path):
    st = stage_dir(tmp_path, "s", {"x": 1})
    assert not st.complete
    out = st.begin()
    (out / "result.txt").write_text("partial")
    assert not st.complete  # outputs alone are not a finished stage
    with pytest.raises(FileNotFoundError):
        st.summary()
    st.finish({"n": 3})
    assert st.complete
    rec = json.loads(st.marker.read_text())
    assert rec["n"] == 3 and rec["key"] == st.key
    assert (out / "config.yaml").is_file()
    with pytest.raises(RuntimeError):
        st.begin()


def test_fresh_begin_removes_leftovers(tmp_path):
    st = stage_dir(tmp_path, "s", {"x": 1})
    (st.begin() / "junk").write_text("x")
    st.begin(fresh=True)
    assert not (st.path / "junk").exists()


def test_files_key_changes_when_a_file_is_rewritten(tmp_path):
    f = tmp_path / "a.raw"
    f.write_bytes(b"1234")
    k1 = files_key([f], tmp_path)
    assert files_key([f], tmp_path) == k1
    f.write_bytes(b"12345")
    assert files_key([f], tmp_path) != k1


def test_atomic_writes_leave_no_temp_files_and_usual_permissions(tmp_path):
    from chemmap.files import atomic_path, write_json_atomic

    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644  # not mkstemp's 0600
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # nothing half-written
