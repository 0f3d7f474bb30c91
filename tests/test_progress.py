"""Progress bars on terminals only: off a terminal (a log file, CI) a run writes no carriage
returns, and each task is one log line."""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

from fusion_bench.utils import progress
from tests.conftest import run_cli, write_pool_config


def test_bars_show_on_a_terminal_unless_disabled(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert not progress.progress_bar(range(3)).disable
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert progress.progress_bar(range(3)).disable
    monkeypatch.delenv("TQDM_DISABLE")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert progress.progress_bar(range(3)).disable


def test_a_run_off_a_terminal_writes_no_bars(tmp_path, bert_pool_dir, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # the tests set it; a user's CI job does not
    write_pool_config(tmp_path / "config", bert_pool_dir)
    result = run_cli("--config-dir", str(tmp_path / "config"), "modelpool=tiny_bert", "taskpool=dummy",
                     f"merged_model_save_path={tmp_path / 'merged'}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)  # fmt: skip
    assert "\r" not in result.stdout + result.stderr
    assert "\r" not in (tmp_path / "run" / "cli.log").read_text()
    assert "merged with TiesMergingAlgorithm" in result.stdout


def test_a_run_on_a_terminal_draws_its_bars(tmp_path, bert_pool_dir):
    write_pool_config(tmp_path / "config", bert_pool_dir)
    try:
        leader, follower = pty.openpty()
    except OSError:
        pytest.skip("no pseudo-terminal here")
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 0×0 terminal makes tqdm give up
    environment = {key: value for key, value in os.environ.items() if key != "TQDM_DISABLE"}
    process = subprocess.Popen(
        [sys.executable, "-m", "fusion_bench", "--config-dir", str(tmp_path / "config"), "modelpool=tiny_bert", "taskpool=dummy",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=follower, env=environment,
    )  # fmt: skip
    os.close(follower)
    drawn = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        drawn += chunk
    assert process.wait(timeout=600) == 0
    os.close(leader)
    assert b"\r" in drawn and b"tensor" in drawn  # the merge's bar over tensors
