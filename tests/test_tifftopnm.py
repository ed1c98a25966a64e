"""examples/tifftopnm (the seeds' Pitchfork example): the library-API
version, the annotated version unrewritten, rewritten and under
``pycompart run``, all byte-identical to Pillow's own conversion; hostile
TIFFs end in a clear error and exit status 1, never a traceback."""

import io
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import pytest

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "tifftopnm")
LIBRARY = os.path.join(EXAMPLE, "tifftopnm.py")
SEGMENTS = os.path.join(EXAMPLE, "tifftopnm_segments.py")
SPEC = os.path.join(EXAMPLE, "segments.toml")


def _picture(mode, size=(67, 45)):
    im = Image.new("RGB", size)
    for y in range(size[1]):
        for x in range(size[0]):
            im.putpixel((x, y), ((x * 7) % 256, (y * 11) % 256, (x * y) % 256))
    return im.convert(mode)


def _big_endian_rgb(path, im, rows_per_strip=8):
    """An uncompressed big-endian ("MM") RGB TIFF in several strips,
    written by hand (Pillow writes little-endian)."""
    w, h = im.size
    raw = im.tobytes()
    strips = [raw[i * w * 3 * rows_per_strip:(i + 1) * w * 3 * rows_per_strip]
              for i in range((h + rows_per_strip - 1) // rows_per_strip)]
    entries = 10
    ifd_at = 8
    after = ifd_at + 2 + entries * 12 + 4
    bps_at = after
    offsets_at = bps_at + 6
    counts_at = offsets_at + 4 * len(strips)
    data_at = counts_at + 4 * len(strips)
    offsets, at = [], data_at
    for s in strips:
        offsets.append(at)
        at += len(s)

    def entry(tag, typ, count, value):
        if typ == 3 and count == 1:
            return struct.pack(">HHIHH", tag, typ, count, value, 0)
        return struct.pack(">HHII", tag, typ, count, value)
    ifd = [entry(256, 3, 1, w), entry(257, 3, 1, h), entry(258, 3, 3, bps_at), entry(259, 3, 1, 1),
           entry(262, 3, 1, 2), entry(273, 4, len(strips), offsets_at), entry(277, 3, 1, 3),
           entry(278, 3, 1, rows_per_strip), entry(279, 4, len(strips), counts_at), entry(284, 3, 1, 1)]
    out = b"MM\x00\x2a" + struct.pack(">I", ifd_at) + struct.pack(">H", entries) + b"".join(ifd) + b"\0\0\0\0"
    out += struct.pack(">HHH", 8, 8, 8) + struct.pack(f">{len(strips)}I", *offsets)
    out += struct.pack(f">{len(strips)}I", *(len(s) for s in strips)) + b"".join(strips)
    with open(path, "wb") as f:
        f.write(out)


def _shared_dir(prefix):
    """A directory the compartments' own uids may read (tmp_path is 0700)."""
    d = tempfile.mkdtemp(prefix=prefix)
    os.chmod(d, 0o755)
    return d


@pytest.fixture(scope="module")
def tiffs():
    d = _shared_dir("pycompart-tiff-")
    files = {}
    pic = _picture("RGB")
    for name, mode, kw in [("rgb_lzw", "RGB", {"compression": "tiff_lzw"}),
                           ("rgb_deflate", "RGB", {"compression": "tiff_adobe_deflate"}),
                           ("rgb_raw", "RGB", {}),
                           ("grey_lzw", "L", {"compression": "tiff_lzw"}),
                           ("grey_packbits", "L", {"compression": "packbits"}),
                           ("bilevel_g4", "1", {"compression": "group4"}),
                           ("palette", "P", {}),
                           ("rgba", "RGBA", {"compression": "tiff_lzw"}),
                           ("strips", "RGB", {"compression": "tiff_lzw", "tiffinfo": {278: 4}})]:
        path = os.path.join(d, name + ".tif")
        _picture(mode).save(path, **kw)
        files[name] = path
    files["big_endian_strips"] = os.path.join(d, "big_endian_strips.tif")
    _big_endian_rgb(files["big_endian_strips"], pic)
    assert Image.open(files["big_endian_strips"]).tobytes() == pic.tobytes()
    for path in files.values():
        os.chmod(path, 0o644)
    yield files
    shutil.rmtree(d)


def reference(path):
    """The uncompartmentalized conversion: Pillow decodes and encodes."""
    sys.path.insert(0, EXAMPLE)
    try:
        import tiffcore
    finally:
        sys.path.remove(EXAMPLE)
    im = Image.open(path)
    out = io.BytesIO()
    im.convert(tiffcore.pnm_mode(im.mode)).save(out, "PPM")
    return out.getvalue()


def _run(argv, **kw):
    return subprocess.run([sys.executable, *argv], capture_output=True, timeout=120, **kw)


@pytest.mark.parametrize("name", ["rgb_lzw", "rgb_deflate", "rgb_raw", "grey_lzw", "grey_packbits",
                                  "bilevel_g4", "palette", "rgba", "strips", "big_endian_strips"])
def test_every_version_writes_what_pillow_writes(tiffs, name):
    path = tiffs[name]
    expected = reference(path)
    assert expected.startswith(b"P5" if name.startswith(("grey", "bilevel")) else b"P6")
    for argv in ([LIBRARY, path], [SEGMENTS, path],
                 ["-m", "pycompart", "run", SPEC, "--", SEGMENTS, path]):
        proc = _run(argv)
        assert proc.returncode == 0, (argv, proc.stderr.decode())
        assert proc.stdout == expected, argv


def test_the_rewritten_program_writes_the_same(tiffs):
    d = _shared_dir("pycompart-tiffout-")
    try:
        proc = _run(["-m", "pycompart", "rewrite", SEGMENTS, "--out", d])
        assert proc.returncode == 0, proc.stderr.decode()
        shutil.copy(SPEC, os.path.join(d, "tifftopnm_segments.toml"))  # the user's privileges
        shutil.copy(os.path.join(EXAMPLE, "tiffcore.py"), d)
        for name in ("rgb_lzw", "grey_lzw", "big_endian_strips"):
            out = _run([os.path.join(d, "tifftopnm_segments.py"), tiffs[name]])
            assert out.returncode == 0, out.stderr.decode()
            assert out.stdout == reference(tiffs[name])
    finally:
        shutil.rmtree(d)


def test_the_rewritten_program_runs_with_the_spec_rewrite_wrote(tiffs):
    """The skeleton asks for descriptors where a segment passes one, and
    rewrite says which modules from beside the program to copy."""
    d = _shared_dir("pycompart-tiffout-")
    try:
        proc = _run(["-m", "pycompart", "rewrite", SEGMENTS, "--out", d])
        assert proc.returncode == 0, proc.stderr.decode()
        assert "imports tiffcore from beside" in proc.stderr.decode()
        with open(os.path.join(d, "tifftopnm_segments.toml")) as f:
            skeleton = f.read()
        libtiff = skeleton.partition("[compartments.libtiff]")[2]
        assert "descriptors = true" in libtiff and "descriptors" not in skeleton.partition("[compartments.libtiff]")[0]
        shutil.copy(os.path.join(EXAMPLE, "tiffcore.py"), d)
        out = _run([os.path.join(d, "tifftopnm_segments.py"), tiffs["rgb_lzw"]])
        assert out.returncode == 0, out.stderr.decode()
        assert out.stdout == reference(tiffs["rgb_lzw"])
        again = _run(["-m", "pycompart", "rewrite", SEGMENTS, "--out", d])
        assert "imports tiffcore" not in again.stderr.decode()  # (copied now)
    finally:
        shutil.rmtree(d)


@pytest.fixture(scope="module")
def hostile():
    d = _shared_dir("pycompart-hostile-tiff-")
    files = {}
    good = io.BytesIO()
    _picture("RGB").save(good, "TIFF", compression="tiff_lzw")
    data = good.getvalue()
    files["truncated"] = data[: len(data) // 2]
    files["garbage"] = b"II*\x00" + os.urandom(4000)
    files["not_tiff"] = b"P6\n1 1\n255\n\x00\x00\x00"
    bomb = io.BytesIO()  # 50 Mpixel of one colour: a few KB deflated
    Image.new("L", (10_000, 5_000)).save(bomb, "TIFF", compression="tiff_adobe_deflate")
    files["bomb"] = bomb.getvalue()
    for name, blob in files.items():
        path = os.path.join(d, name + ".tif")
        with open(path, "wb") as f:
            f.write(blob)
        os.chmod(path, 0o644)
        files[name] = path
    yield files
    shutil.rmtree(d)


@pytest.mark.parametrize("name", ["truncated", "garbage", "not_tiff", "bomb"])
@pytest.mark.parametrize("program", [LIBRARY, SEGMENTS])
def test_a_hostile_tiff_is_a_clear_error_and_status_1(hostile, name, program):
    argv = [program, hostile[name]] if program == LIBRARY else \
        ["-m", "pycompart", "run", SPEC, "--", program, hostile[name]]
    proc = _run(argv)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert proc.stdout == b"" and "Traceback" not in err and err.count("\n") <= 2, err
    if name == "bomb":
        assert "DecompressionBomb" in err


def test_a_crashing_decoder_is_a_clear_error_and_status_1(tiffs, tmp_path):
    """The decoder's process dies (as a libtiff bug would make it): main
    says so and exits 1."""
    crash = tmp_path / "crashcore.py"
    crash.write_text("import os, pycompart\n"
                     "def decode_fd(fd: pycompart.Fd) -> tuple[str, int, int, bytes]:\n"
                     "    os.kill(os.getpid(), 11)\n")
    # main() of tifftopnm.py as it is, with its decoder's entrypoint swapped.
    wrapper = tmp_path / "wrap.py"
    wrapper.write_text(
        f"import sys, runpy\nsys.path[:0] = [{EXAMPLE!r}, {str(tmp_path)!r}]\n"
        f"g = runpy.run_path({LIBRARY!r}, run_name='tifftopnm')\n"
        "g['SPEC']['compartments']['libtiff']['functions'] = ['crashcore:decode_fd']\n"
        "import crashcore  # (main reads its annotations)\n"
        "import pycompart.frontend.app as A\n"
        "orig = A.App.function\n"
        "A.App.function = lambda self, key: orig(self, 'crashcore:decode_fd' if key == 'tiffcore:decode_fd' else key)\n"
        "sys.exit(g['main'](sys.argv[1:]))\n")
    tmp_path.chmod(0o755)  # the decoder's own uid imports crashcore from here
    for p in tmp_path.iterdir():
        p.chmod(0o644)
    proc = _run([str(wrapper), tiffs["rgb_lzw"]])
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "CompartmentCrashed" in err and "libtiff" in err and "Traceback" not in err, err


def test_the_decoder_reads_its_descriptor_but_can_open_nothing(tiffs, tmp_path):
    """The privilege the spec gives libtiff, tried from inside it: the
    input it was handed reads; the same file by its path, or any other,
    does not open."""
    probe = tmp_path / "probecore.py"
    probe.write_text(
        "import os, pycompart\n"
        "def decode_fd(fd: pycompart.Fd) -> tuple[str, int, int, bytes]:\n"
        "    path = os.readlink(f'/proc/self/fd/{fd.fileno()}')\n"
        "    head = os.pread(fd.fileno(), 4, 0)\n"
        "    tried = []\n"
        "    for p in (path, '/etc/hostname', os.path.dirname(path) + '/x.tif'):\n"
        "        try:\n"
        "            open(p, 'ab' if p.endswith('x.tif') else 'rb').close(); tried.append('opened')\n"
        "        except OSError as exc:\n"
        "            tried.append(type(exc).__name__)\n"
        "    return ','.join(tried), 1, 1, head\n")
    wrapper = tmp_path / "wrap.py"
    wrapper.write_text(
        f"import os, sys, runpy\nsys.path[:0] = [{EXAMPLE!r}, {str(tmp_path)!r}]\n"
        f"g = runpy.run_path({LIBRARY!r}, run_name='tifftopnm')\n"
        "g['SPEC']['compartments']['libtiff']['functions'] = ['probecore:decode_fd']\n"
        "import probecore, pycompart\n"
        "with pycompart.App(g['SPEC']) as app:\n"
        "    with pycompart.Fd(os.open(sys.argv[1], os.O_RDONLY)) as fd:\n"
        "        print(app.function('probecore:decode_fd')(fd))\n")
    tmp_path.chmod(0o755)
    for p in tmp_path.iterdir():
        p.chmod(0o644)
    proc = _run([str(wrapper), tiffs["rgb_lzw"]])
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip() == \
        "('PermissionError,PermissionError,PermissionError', 1, 1, b'II*\\x00')"
