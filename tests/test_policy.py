"""Policy resolution without processes: what a spec and a host turn into,
and fail-closed behaviour when the host lacks a mechanism."""

import os
import sys
import warnings

import msgspec
import pytest

from pycompart.policy import resolution as policy
from pycompart.errors import PrivilegeError
from pycompart.kernel.host import HostSupport
from pycompart.policy.spec import load_spec

FULL = HostSupport(root=True, landlock_abi=7, seccomp=True, seccomp_detail="ok", net_namespace=True,
                   namespace_detail="ok", cgroup_v1=(), cgroup_v2=False)
BARE = HostSupport(root=True, landlock_abi=0, seccomp=False, seccomp_detail="no libseccomp",
                   net_namespace=False, namespace_detail="unshare: EPERM", cgroup_v1=(), cgroup_v2=False)


def comp(privileges=None, **extra):
    spec = {"compartments": {"c": dict(extra, **({"privileges": privileges} if privileges is not None else {}))}}
    return load_spec(spec).compartments["c"]


def test_defaults_lock_everything_down():
    res = policy.resolve(comp(), sys.path, None, host=FULL, euid=0)
    lock = res.lockdown
    # A uid of its own, allocated at start (not a shared nobody), and the
    # default bounds on memory and tasks.
    assert lock.dynamic_user and (lock.uid, lock.gid) == (None, None)
    assert lock.limits == {"memory": 2 << 30, "processes": 128}
    assert not (lock.fs_symlinks or lock.fs_fifos or lock.file_locks) and lock.file_metadata == "none"
    assert lock.fs and lock.fs_write == ["/dev/null"] and lock.fs_execute == []
    assert lock.net_namespace and not lock.loopback and lock.tcp and lock.tcp_connect == []
    assert lock.seccomp and lock.syscall_profile == "python" and lock.sockets == "none"
    assert lock.scopes and lock.ipc_namespace and lock.keep_capabilities == []
    assert os.path.realpath(sys.executable) in lock.fs_read
    assert not res.missing


def test_strict_refuses_naming_every_missing_mechanism():
    with pytest.raises(PrivilegeError) as info:
        policy.resolve(comp(), sys.path, None, host=BARE, euid=0)
    text = str(info.value)
    for words in ("'c'", "filesystem rules", "network = 'none'", "Landlock scopes", "seccomp",
                  "best-effort"):
        assert words in text


def test_best_effort_leaves_out_and_warns_once():
    c = comp({"enforcement": "best-effort"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = policy.resolve(c, sys.path, None, host=BARE, euid=0)
        policy.resolve(c, sys.path, None, host=BARE, euid=0)
    lock = res.lockdown
    assert not (lock.fs or lock.tcp or lock.scopes or lock.seccomp or lock.net_namespace)
    assert lock.dynamic_user  # what the host can do is still done
    messages = [str(w.message) for w in caught if issubclass(w.category, policy.PrivilegeWarning)]
    assert len(messages) == len(res.missing) >= 4  # once each, not once per resolve


def test_app_level_enforcement_default():
    spec = load_spec({"app": {"enforcement": "best-effort"}, "compartments": {"c": {}}})
    assert spec.compartments["c"].privileges.enforcement == "best-effort"


def test_processes_cannot_bind_root():
    with pytest.raises(PrivilegeError, match="processes"):
        policy.resolve(comp({"user": "root", "processes": 4}), sys.path, None, host=FULL, euid=0)
    lock = policy.resolve(comp({"processes": 4}), sys.path, None, host=FULL, euid=0).lockdown
    assert lock.limits == {"processes": 4, "memory": 2 << 30}
    # The default bound does not stop a root compartment from starting: it is noted.
    res = policy.resolve(comp({"user": "root"}), sys.path, None, host=FULL, euid=0)
    assert "processes" not in res.lockdown.limits
    assert any("default bound of 128 processes" in n for n in res.notes)


def test_default_bounds_can_be_lifted_and_count_per_instance_as_non_root():
    lock = policy.resolve(comp({"memory": "unlimited", "processes": "unlimited"}), sys.path, None,
                          host=FULL, euid=0).lockdown
    assert lock.limits == {}
    res = policy.resolve(comp(), sys.path, None, host=FULL, euid=1000)
    assert res.lockdown.user_namespace and res.lockdown.limits["processes"] == 128
    assert any("this instance alone" in n for n in res.notes)
    no_userns = msgspec.structs.replace(FULL, net_namespace=False)
    res = policy.resolve(comp({"network": "host"}), sys.path, None, host=no_userns, euid=1000)
    assert "processes" not in res.lockdown.limits  # would count every process of main's user
    with pytest.raises(PrivilegeError, match="processes"):
        policy.resolve(comp({"network": "host", "processes": 8}), sys.path, None, host=no_userns, euid=1000)


def test_file_metadata_needs_a_uid_of_its_own():
    assert policy.resolve(comp({"file_metadata": "own-files"}), sys.path, None, host=FULL,
                          euid=0).lockdown.file_metadata == "own-files"
    for privileges, euid in (({"file_metadata": "own-files", "user": "nobody"}, 0),
                             ({"file_metadata": "own-files"}, 1000)):
        with pytest.raises(PrivilegeError, match="own-files"):
            policy.resolve(comp(privileges), sys.path, None, host=FULL, euid=euid)


def test_non_root_main_cannot_change_user_or_keep_capabilities():
    with pytest.raises(PrivilegeError, match="changing user needs root"):
        policy.resolve(comp({"user": "root"}), sys.path, None, host=FULL, euid=1000)
    with pytest.raises(PrivilegeError, match="capabilities"):
        policy.resolve(comp({"capabilities": ["net_bind_service"]}), sys.path, None, host=FULL, euid=1000)
    res = policy.resolve(comp(), sys.path, None, host=FULL, euid=1000)
    assert res.lockdown.uid is None and any("not root" in n for n in res.notes)


def test_every_name_this_host_lacks_is_reported_at_once():
    """A user, a group, capabilities, a profile and system calls that do not
    exist here: one error, a line each, with a suggestion when one is close."""
    with pytest.raises(PrivilegeError) as info:
        policy.resolve(comp({"user": "no-such-user-q", "group": "no-such-group-q", "capabilities": ["fly", "net_bind_servce"],
                             "syscalls": {"allow": ["opennat"]}}), sys.path, None, host=FULL, euid=0)
    lines = str(info.value).splitlines()
    assert len(lines) == 5, lines
    assert all(line.startswith("compartment 'c': privileges.") for line in lines)
    assert "did you mean 'CAP_NET_BIND_SERVICE'?" in lines[3] and "opennat" in lines[4]
    with pytest.raises(PrivilegeError, match="did you mean 'python'"):
        policy.resolve(comp({"syscalls": "pyhton"}), sys.path, None, host=FULL, euid=0)
    with pytest.raises(PrivilegeError, match="without a user"):  # a mistake, not the host's lack
        policy.resolve(comp({"group": "root"}), sys.path, None, host=FULL, euid=0)


def test_unknown_names_are_errors_not_silently_ignored():
    with pytest.raises(PrivilegeError, match="opennat"):
        policy.resolve(comp({"syscalls": {"kill": ["opennat"]}}), sys.path, None, host=FULL, euid=0)
    with pytest.raises(PrivilegeError, match="unknown profile"):
        policy.resolve(comp({"syscalls": "everything"}), sys.path, None, host=FULL, euid=0)
    with pytest.raises(PrivilegeError, match="CAP_FLY"):
        policy.resolve(comp({"capabilities": ["fly"]}), sys.path, None, host=FULL, euid=0)


def test_network_modes():
    lock = policy.resolve(comp({"network": {"connect": [443], "bind": [8080]}}), sys.path, None,
                          host=FULL, euid=0).lockdown
    assert not lock.net_namespace and lock.tcp and lock.tcp_connect == [443] and lock.tcp_bind == [8080]
    assert lock.sockets == "inet-stream"
    lock = policy.resolve(comp({"network": "loopback"}), sys.path, None, host=FULL, euid=0).lockdown
    assert lock.net_namespace and lock.loopback and lock.sockets == "inet"
    lock = policy.resolve(comp({"network": "host"}), sys.path, None, host=FULL, euid=0).lockdown
    assert not lock.net_namespace and not lock.tcp and lock.sockets == "any"


def test_execute_adds_the_dynamic_loader():
    lock = policy.resolve(comp({"filesystem": {"execute": ["/bin"]}}), sys.path, None,
                          host=FULL, euid=0).lockdown
    assert lock.fs_execute[0] == "/bin" and any("ld-linux" in p for p in lock.fs_execute[1:])


def test_reachability():
    import pathlib
    import shutil
    import tempfile

    base = pathlib.Path(tempfile.mkdtemp(dir="/tmp"))  # /tmp itself is world-searchable
    os.chmod(base, 0o755)
    outer = base / "outer"
    inner = outer / "inner"
    inner.mkdir(parents=True)
    os.chmod(outer, 0o700)
    os.chmod(inner, 0o755)
    st = os.stat(outer)
    stranger = st.st_uid + 12345
    assert policy.reachability(str(inner), stranger, None) == "ancestors"
    assert policy.reachability(str(outer), stranger, None) == "denied"
    assert policy.reachability(str(inner), st.st_uid, None) == "ok"
    os.chmod(outer, 0o755)
    assert policy.reachability(str(inner), stranger, None) == "ok"
    shutil.rmtree(base)


def test_inline_refuses_explicit_privileges():
    with pytest.raises(PrivilegeError, match="inline"):
        policy.resolve(comp({"memory": "1GiB"}, mechanism="inline"), sys.path, None, host=FULL, euid=0)
    policy.resolve(comp(mechanism="inline"), sys.path, None, host=FULL, euid=0)  # nothing asked


def test_auto_read_set_is_shown(tmp_path):
    res = policy.resolve(comp(), [str(tmp_path)], "/x/prog.py", host=FULL, euid=0)
    assert str(tmp_path) in res.auto_read and "/x/prog.py" in res.auto_read



def _filter_args():  # type: ignore[no-untyped-def]
    return ("python", (), (), (), "none", "none", False, False)


def test_a_compiled_filter_is_kept_and_used_again(tmp_path, monkeypatch):
    from pycompart.kernel import seccomp

    monkeypatch.setattr(policy, "FILTER_CACHE", str(tmp_path / "filters"))
    first = policy._compiled.__wrapped__(*_filter_args())
    monkeypatch.setattr(seccomp, "compile_bpf", lambda *a: pytest.fail("compiled again"))
    assert policy._compiled.__wrapped__(*_filter_args()) == first


@pytest.mark.parametrize("tamper", ["writable file", "writable directory", "another user's directory"])
def test_a_filter_anybody_else_could_have_written_is_compiled_afresh(tmp_path, monkeypatch, tamper):
    """The cache sits in /var/tmp, everybody's: a filter there is used only
    from a directory and a file of this user's that nobody else may write."""
    from pycompart.kernel import seccomp

    base = tmp_path / "filters"
    monkeypatch.setattr(policy, "FILTER_CACHE", str(base))
    real = policy._compiled.__wrapped__(*_filter_args())
    folder = tmp_path / f"filters-{os.getuid()}"
    (cached,) = folder.iterdir()
    cached.write_bytes(b"\0" * 8)  # what a planted, weakened filter would be
    if tamper == "writable file":
        os.chmod(cached, 0o666)
    elif tamper == "writable directory":
        os.chmod(folder, 0o777)
    else:
        if os.geteuid() != 0:
            pytest.skip("needs root to give the directory away")
        os.chown(folder, 65534, 65534)
    compiled = []
    original = seccomp.compile_bpf
    monkeypatch.setattr(seccomp, "compile_bpf", lambda *a: compiled.append(1) or original(*a))
    assert policy._compiled.__wrapped__(*_filter_args()) == real
    assert compiled == [1]


def test_a_home_directory_or_the_root_on_sys_path_is_not_made_readable(tmp_path, monkeypatch):
    """``pycompart run SPEC -m pkg`` puts the working directory first on
    ``sys.path``, as python does; run from a home directory, every
    compartment could read ``~/.ssh``. A home directory or ``/`` is left
    out, with a warning naming it; a directory below it is not."""
    home = tmp_path / "home"
    (home / "project").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    res = policy.resolve(comp(), [str(home), "/", str(home / "project")], None, host=FULL, euid=0)
    assert str(home) not in res.lockdown.fs_read and "/" not in res.lockdown.fs_read
    assert str(home / "project") in res.lockdown.fs_read
    assert any(str(home) in w and "home directory" in w for w in res.warnings), res.warnings
    assert any(w.startswith("/ is on sys.path") for w in res.warnings), res.warnings
    granted = policy.resolve(comp({"filesystem": {"read": [str(home)]}}), [str(home)], None, host=FULL, euid=0)
    assert str(home) in granted.lockdown.fs_read  # (the spec's to grant)
