"""The transfer benchmark's hook client against the emulator over TLS: its figures, and its profile when asked."""

from __future__ import annotations

from pathlib import Path

from benchmarks.emulator import EmulatorProcess
import pytest

from benchmarks.transfer import DownloadClient, file_md5, prepare_download

SIZE = 8 * 1024 * 1024  # long enough for the hash to be sampled: 1 MiB of md5 takes about 1.5 ms


def test_the_hook_client_profiles_the_download_it_is_asked_to(tmp_path: Path) -> None:
    with EmulatorProcess() as emulator:
        key, url = prepare_download(emulator, SIZE)
        with DownloadClient("hook", emulator.ca_path, emulator.conn_env, tmp_path / "hook.log") as client:
            plain = client.download(key, url, tmp_path / "plain.zip", tmp_path)
            profile = tmp_path / "hook.txt"
            profiled = client.download(key, url, tmp_path / "profiled.zip", tmp_path, profile)
    # Both downloads stored the same verified bytes; only the second wrote a profile.
    assert plain["md5"] == profiled["md5"] == file_md5(tmp_path / "plain.zip") == file_md5(tmp_path / "profiled.zip")
    assert plain["bytes"] == profiled["bytes"] >= SIZE
    assert set(plain["phases"]) == {"read_s", "hash_s", "write_s", "commit_s", "other_s"}
    tree = profile.read_text()
    # The call tree goes down from the hook's download to the md5 of each chunk.
    for step in ("MuseHook.download", "AtomicWrite.write", "StreamMd5.update"):
        assert step in tree, step
    assert [path.name for path in tmp_path.glob("*.txt")] == ["hook.txt"]


def test_only_the_hook_client_profiles(tmp_path: Path) -> None:
    with DownloadClient("bare", None, {}, tmp_path / "bare.log") as client:
        with pytest.raises(ValueError, match="only the hook client profiles"):
            client.download("", "http://127.0.0.1:9/", tmp_path / "x.zip", tmp_path, tmp_path / "bare.txt")
    assert not (tmp_path / "bare.txt").exists()
