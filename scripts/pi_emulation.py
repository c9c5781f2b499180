"""A Raspberry Pi 5 without a Pi: Debian bookworm arm64 with its Python 3.11, run under `qemu-aarch64-static`.

Raspberry Pi OS Bookworm is Debian bookworm (glibc 2.36, Python 3.11) on four Cortex-A76 cores. This script builds
that userland into a cache folder and installs OUR wheel there exactly as `pip install 'edge-gemma[onnx,listen]'` would
on the Pi: aarch64 wheels of every runtime dependency (no torch), our wheel built from the checkout, and the
`edge-gemma` console script pip generates. It then runs commands with the aarch64 interpreter under user-mode qemu
(`-cpu cortex-a76`: the Pi 5's core, NEON dotprod, no i8mm, no SVE). No binfmt, no chroot, no root needed to run;
debootstrap needs root (CI runs as root).

What it proves: the Pi install path, that nothing imports torch, and the numerics of the aarch64 kernels (the same
greedy tokens as x86). What it does not: speed (qemu is ~10-50x slower than the real core; see
benchmarks/pi5_estimate.py for the estimate).

Layout of the cache folder (default `.cache/pi5-rootfs` in the checkout, git-ignored, reused when present):

    rootfs/   debootstrap --foreign minbase + python3 + libportaudio2 (what `sounddevice` loads for `listen`), every
              .deb extracted with `dpkg-deb -x`,
              proc/cpuinfo replaced by a Pi 5 text (onnxruntime's cpuinfo segfaults under qemu without it)
    wheels/   aarch64 cp311 wheels of the dependencies (pip download --platform manylinux_2_XX_aarch64 --only-binary)
    dist/     our wheel, rebuilt from a clean copy of the checkout on every `prepare`
    site/     `pip install --target` of our wheel with its extras: the Pi's site-packages, bin/edge-gemma included

Usage:
    python scripts/pi_emulation.py prepare [--cache DIR] [--extras onnx,listen]
    python scripts/pi_emulation.py run [--cache DIR] -- edge-gemma run ARTIFACT --prompt "Hi" --max-new-tokens 16
    python scripts/pi_emulation.py run [--cache DIR] -- python -c "import onnxruntime; print(onnxruntime.__version__)"
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO / ".cache" / "pi5-rootfs"
SUITE = "bookworm"  # Raspberry Pi OS Bookworm's base: glibc 2.36, Python 3.11.2
MIRROR = os.environ.get("EDGE_GEMMA_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBS = ["python3", "libportaudio2"]  # python3 pulls python3.11, libssl3, libffi8; portaudio for `listen`
PYTHON_VERSION = "3.11"
GLIBC_MINOR = 36  # bookworm's glibc 2.36: every manylinux_2_17 ... manylinux_2_36 aarch64 wheel runs there
QEMU_CPU = "cortex-a76"  # the Raspberry Pi 5's core (BCM2712: 4x Cortex-A76 @ 2.4 GHz)
ROOTFS_MARKER = ".edge-gemma-rootfs"  # written last: a rootfs without it is incomplete and rebuilt

# /proc/cpuinfo of a Raspberry Pi 5 (4x Cortex-A76 r4p1). qemu-user opens `-L`-prefixed paths first, so
# rootfs/proc/cpuinfo is what onnxruntime's cpuinfo library reads; the host's x86 text makes it crash.
_CPU_BLOCK = """processor\t: {index}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1
"""
PI5_CPUINFO = ("\n".join(_CPU_BLOCK.format(index=i) for i in range(4))
               + "\nRevision\t: d04170\nSerial\t\t: 0000000000000000\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n")

# Folders of the checkout that a wheel build never needs; `build/` in particular holds stale files of earlier
# builds that setuptools would otherwise copy into the wheel.
_NOT_FOR_WHEEL = {".git", ".venv", ".cache", "build", "dist", "artifacts", "tests", "benchmarks", "android_demo",
                  ".pytest_cache"}


class PiEmulationError(RuntimeError):
    """A step of the emulated Pi's preparation failed; the message names the step and the tool."""


def pip_platform_args() -> list[str]:
    """`pip --platform ...` flags for bookworm aarch64: pip does not widen one manylinux tag to older ones, so each
    glibc minor from 2.17 to 2.36 is listed, plus the legacy manylinux2014 alias."""
    args: list[str] = []
    for minor in range(GLIBC_MINOR, 16, -1):
        args += ["--platform", f"manylinux_2_{minor}_aarch64"]
    args += ["--platform", "manylinux2014_aarch64", "--python-version", PYTHON_VERSION, "--implementation", "cp",
             "--abi", f"cp{PYTHON_VERSION.replace('.', '')}", "--only-binary=:all:"]
    return args


@dataclasses.dataclass(frozen=True, kw_only=True)
class PiEmulation:
    """A prepared cache folder: where the aarch64 rootfs and site-packages lie, and how to run a command there."""

    cache: Path

    @property
    def rootfs(self) -> Path:
        return self.cache / "rootfs"

    @property
    def site(self) -> Path:
        return self.cache / "site"

    @property
    def python(self) -> Path:
        return self.rootfs / "usr" / "bin" / f"python{PYTHON_VERSION}"

    @property
    def console_script(self) -> Path:
        return self.site / "bin" / "edge-gemma"

    def command(self, argv: list[str]) -> list[str]:
        """qemu + the aarch64 python + argv. `edge-gemma ...` runs the console script pip generated in site/bin
        (its x86 shebang is not used: the aarch64 python runs the file, as the Pi's pip-written shebang would)."""
        if not argv:
            raise ValueError("nothing to run: give `edge-gemma ARGS...` or `python ARGS...`")
        head, rest = argv[0], argv[1:]
        if head == "edge-gemma":
            rest = [str(self.console_script), *rest]
        elif head not in ("python", "python3", f"python{PYTHON_VERSION}"):
            raise ValueError(f"can run `edge-gemma` or `python` in the emulated Pi, not {head!r}")
        # -P (Python 3.11): no current directory or script folder on sys.path, so a checkout in the working
        # directory never shadows the installed wheel.
        return [qemu_binary(), "-cpu", QEMU_CPU, "-L", str(self.rootfs), str(self.python), "-P", *rest]

    def env(self, extra_path: list[Path] | None = None) -> dict[str, str]:
        """The host environment less anything that points Python at the host, with site/ on PYTHONPATH."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PYTHON", "VIRTUAL_ENV", "QEMU_", "CONDA"))}
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in [*(extra_path or []), self.site])
        env["PYTHONNOUSERSITE"] = "1"
        env.setdefault("LC_ALL", "C.UTF-8")
        return env

    def run(self, argv: list[str], *, extra_path: list[Path] | None = None, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), env=self.env(extra_path), **kwargs)


def qemu_binary() -> str:
    path = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
    if path is None:
        raise PiEmulationError("qemu-aarch64-static not found (Debian package qemu-user-static; see "
                               "scripts/debian-packages.txt)")
    return path


def _check(cmd: list[str], step: str, **kwargs) -> subprocess.CompletedProcess:
    log.debug("%s: %s", step, " ".join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise PiEmulationError(f"{step} failed (exit {result.returncode}): {' '.join(cmd[:4])} ...\n"
                               f"{(result.stdout + result.stderr)[-3000:]}")
    return result


def prepare_rootfs(cache: Path) -> Path:
    """Debian bookworm arm64 with python3.11, built once: debootstrap's first stage downloads and unpacks the
    required packages; the --include'd ones (python3, ...) are only downloaded, so every cached .deb is extracted
    with `dpkg-deb -x` (no maintainer scripts run: none is needed to start python)."""
    rootfs = cache / "rootfs"
    if (rootfs / ROOTFS_MARKER).is_file():
        log.info("rootfs: reusing %s", rootfs)
        return rootfs
    for tool in ("debootstrap", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise PiEmulationError(f"{tool} not found (Debian packages debootstrap and dpkg; see "
                                   "scripts/debian-packages.txt)")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".rootfs.tmp-", dir=cache))
    try:
        _check(["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase", f"--include={','.join(DEBS)}",
                SUITE, str(tmp), MIRROR], "debootstrap (first stage, arm64)")
        archives = tmp / "var" / "cache" / "apt" / "archives"
        debs = sorted(archives.glob("*.deb"))
        if not any(d.name.startswith(f"python{PYTHON_VERSION}_") for d in debs):
            raise PiEmulationError(f"debootstrap left no python{PYTHON_VERSION} .deb in {archives}")
        for deb in debs:
            _check(["dpkg-deb", "-x", str(deb), str(tmp)], f"dpkg-deb -x {deb.name}")
            deb.unlink()  # ~60 MB of archives not needed once extracted
        (tmp / "proc").mkdir(exist_ok=True)
        (tmp / "proc" / "cpuinfo").write_text(PI5_CPUINFO)
        python = tmp / "usr" / "bin" / f"python{PYTHON_VERSION}"
        if not python.is_file():
            raise PiEmulationError(f"{python}: missing after extracting {len(debs)} packages")
        (tmp / ROOTFS_MARKER).write_text(f"{SUITE} arm64 {' '.join(DEBS)}\n")
        if rootfs.exists():
            shutil.rmtree(rootfs)
        os.replace(tmp, rootfs)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return rootfs


def build_wheel(repo: Path, dist: Path) -> Path:
    """`pip wheel . --no-deps` of a clean copy of the checkout (no stale build/ files), into dist/ (emptied first)."""
    dist.mkdir(parents=True, exist_ok=True)
    for old in dist.glob("*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="edge-gemma-src-") as tmp:
        src = Path(tmp) / "src"
        top = str(repo)

        def ignore(folder: str, names: list[str]) -> list[str]:
            return [n for n in names if (folder == top and n in _NOT_FOR_WHEEL) or n == "__pycache__"
                    or n.endswith((".egg-info", ".pyc"))]

        shutil.copytree(repo, src, ignore=ignore)
        # The venv's setuptools first (no build isolation: offline, ~10 s faster); an isolated build when that
        # setuptools is too old for pyproject's build-system (Python 3.11's venv ships 65.x).
        build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)]
        if subprocess.run([*build[:5], "--no-build-isolation", *build[5:]], capture_output=True).returncode != 0:
            log.info("our wheel: the venv's setuptools could not build it; building in an isolated environment")
            _check(build, "pip wheel (our wheel)")
    wheels = sorted(dist.glob("edge_gemma-*.whl"))
    if len(wheels) != 1:
        raise PiEmulationError(f"{dist}: expected one edge_gemma wheel, found {[w.name for w in wheels]}")
    return wheels[0]


def _wheel_key(wheel: Path, extras: str) -> str:
    """Content key of our wheel: its RECORD lists the sha256 of every file (zip timestamps do not matter)."""
    with zipfile.ZipFile(wheel) as zf:
        record = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
        return hashlib.sha256(zf.read(record) + extras.encode()).hexdigest()


def install_site(cache: Path, wheel: Path, extras: str) -> Path:
    """site/ = `pip install --target` of our wheel with its extras, for aarch64 cp311. The dependency wheels come
    from wheels/ (offline); only when that fails (first run, or pyproject's dependencies changed) does pip download
    the missing ones into wheels/."""
    site = cache / "site"
    key = _wheel_key(wheel, extras)
    stamp = site / ".edge-gemma-wheel"
    if stamp.is_file() and stamp.read_text().strip() == key:
        log.info("site: reusing %s (same wheel)", site)
        return site
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    requirement = f"{wheel}[{extras}]" if extras else str(wheel)
    tmp = Path(tempfile.mkdtemp(prefix=".site.tmp-", dir=cache))
    try:
        install = [sys.executable, "-m", "pip", "install", "-q", "--no-warn-conflicts", "--no-compile",
                   "--target", str(tmp), *pip_platform_args(), "--find-links", str(wheels), requirement]
        offline = subprocess.run([*install[:4], "--no-index", *install[4:]], capture_output=True, text=True)
        if offline.returncode != 0:
            log.info("site: fetching aarch64 wheels into %s", wheels)
            _check([sys.executable, "-m", "pip", "download", "-q", "-d", str(wheels), *pip_platform_args(),
                    requirement], "pip download (aarch64 dependency wheels)")
            (wheels / wheel.name).unlink(missing_ok=True)  # ours is rebuilt every time: never cache it
            shutil.rmtree(tmp)
            tmp.mkdir()
            _check([*install[:4], "--no-index", *install[4:]], "pip install --target (aarch64 site)")
        if not (tmp / "bin" / "edge-gemma").is_file():
            raise PiEmulationError(f"pip install --target {tmp}: no bin/edge-gemma console script")
        (tmp / ".edge-gemma-wheel").write_text(key + "\n")
        if site.exists():
            shutil.rmtree(site)
        os.replace(tmp, site)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return site


def prepare(cache: Path = DEFAULT_CACHE, *, extras: str = "onnx,listen", repo: Path = REPO) -> PiEmulation:
    """rootfs (once) + our freshly built wheel and its dependencies in site/; returns the ready emulation."""
    cache = cache.resolve()
    qemu_binary()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:  # two test sessions preparing one cache take turns
        fcntl.flock(lock, fcntl.LOCK_EX)
        prepare_rootfs(cache)
        wheel = build_wheel(repo, cache / "dist")
        install_site(cache, wheel, extras)
    return PiEmulation(cache=cache)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["prepare", "run"])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"cache folder (default {DEFAULT_CACHE})")
    parser.add_argument("--extras", default="onnx,listen",
                        help="extras of our wheel to install (default onnx,listen; e.g. litert)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="after `--`: edge-gemma ARGS... or python ARGS...")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.action == "prepare":
            emu = prepare(args.cache, extras=args.extras)
            print(f"ready: {emu.site}\nrun:   python scripts/pi_emulation.py run -- edge-gemma run ARTIFACT "
                  f"--prompt 'Hello'")
            return 0
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        emu = PiEmulation(cache=args.cache.resolve())
        if not (emu.rootfs / ROOTFS_MARKER).is_file() or not emu.console_script.is_file():
            raise PiEmulationError(f"{emu.cache}: not prepared (run: python scripts/pi_emulation.py prepare)")
        return emu.run(command).returncode
    except (PiEmulationError, ValueError) as exc:
        print(f"pi_emulation: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
