"""The on-disk cache: a folder is built once, and builders racing for it all end with one whole copy."""

from fusion_bench.utils.cache import build_once


def test_a_folder_is_built_once(tmp_path):
    calls = []

    def build(staging):
        calls.append(staging)
        (staging / "data").write_text("built")

    target = tmp_path / "cache" / "thing"
    assert build_once(target, build) == target and build_once(target, build) == target
    assert len(calls) == 1 and (target / "data").read_text() == "built"
    assert [path.name for path in target.parent.iterdir()] == ["thing"]  # no staging left


def test_a_builder_that_loses_the_race_keeps_the_winners_folder(tmp_path):
    target = tmp_path / "thing"

    def build(staging):
        (staging / "data").write_text("mine")
        target.mkdir()  # another process finished first, while this one was building
        (target / "data").write_text("theirs")

    assert build_once(target, build) == target
    assert (target / "data").read_text() == "theirs" and [path.name for path in tmp_path.iterdir()] == ["thing"]
