"""Mount points as /proc/self/mountinfo spells them."""

from cafuse.mountinfo import canonical, unescape


def test_octal_escapes_are_undone_and_other_bytes_kept():
    # The kernel escapes only space, tab, newline and backslash.
    assert unescape(rb"/mnt/a\040b\011c\012d\134e") == b"/mnt/a b\tc\nd\\e"
    assert unescape("/mnt/żółw".encode()) == "/mnt/żółw".encode()


def test_symlinks_are_resolved_to_the_last_component(tmp_path, monkeypatch):
    (tmp_path / "real dir").mkdir()
    (tmp_path / "link").symlink_to("real dir")
    (tmp_path / "chain").symlink_to(tmp_path / "link")
    assert canonical(str(tmp_path / "chain")) == str(tmp_path / "real dir")
    assert canonical(str(tmp_path / "real dir") + "/") == str(tmp_path / "real dir")
    monkeypatch.chdir(tmp_path)
    assert canonical("link") == str(tmp_path / "real dir")


def test_a_relative_link_is_followed_from_the_real_directory_of_the_link(tmp_path):
    (tmp_path / "data" / "x").mkdir(parents=True)
    (tmp_path / "data" / "m").mkdir()
    (tmp_path / "a").symlink_to("data/x")
    (tmp_path / "data" / "x" / "mnt").symlink_to("../m")
    assert canonical(str(tmp_path / "a" / "mnt")) == str(tmp_path / "data" / "m")
