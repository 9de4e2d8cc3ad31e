"""The tested dependency set: write it (``lock``), and try the newest or the oldest releases against the suite.

    python tools/deps.py lock      # fresh venv, newest versions within pyproject's bounds -> constraints.txt
    python tools/deps.py newest    # fresh venv, newest releases the registry serves (bounds ignored), fast suite,
                                   # and for each failure the package that broke it
    python tools/deps.py oldest    # fresh venv, every direct dependency at its lower bound, fast suite

Each builds a throwaway virtual environment under a temporary folder and leaves the repository's own
environment alone. Standard library only: it must run before anything is installed. Not part of CI (it
asks the registry for whatever is newest today); see docs/maintainers.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
# torch is the user's platform build (CPU, CUDA x.y, ROCm x.y, or a community gfx803 build): pinning it here
# would make pip replace a ROCm build with PyPI's CUDA one. These packages are pinned by torch itself
# (sympy exactly on some torch releases), so a pin of ours could only conflict with the user's torch; pip and
# setuptools are the installer's own.
NOT_PINNED = re.compile(r"^(torch|triton|pytorch-triton.*|nvidia-.*|sympy|mpmath|lowvram|pip|setuptools|wheel)$", re.IGNORECASE)
TORCH_LINE = re.compile(r"^# torch: (\S+)")


def tested_torch() -> str:
    """The torch version CI installs, from the constraints file's header (one place holds it)."""
    for line in CONSTRAINTS.read_text().splitlines():
        m = TORCH_LINE.match(line)
        if m:
            return m.group(1)
    raise SystemExit(f"{CONSTRAINTS} has no '# torch: X.Y.Z' line")


def direct_requirements(extras: tuple[str, ...] = ("test",)) -> list[str]:
    """pyproject's dependencies plus the named extras, as written there."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return reqs


def req_name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip()


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class Venv:
    """A throwaway virtual environment."""

    def __init__(self, where: Path) -> None:
        self.dir = where
        subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
        self.python = str(where / "bin" / "python")
        self.pip("install", "--quiet", "--upgrade", "pip")

    def pip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        print("+ pip " + " ".join(args), flush=True)
        return subprocess.run([self.python, "-m", "pip", *args], text=True, check=check,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def versions(self) -> dict[str, str]:
        out = self.pip("list", "--format", "json", "--exclude-editable").stdout
        return {norm(p["name"]): p["version"] for p in json.loads(out[out.index("["):])}

    def pytest(self, *args: str) -> dict[str, str]:
        """Run the fast suite (or the given test ids); return failed/errored test id -> first error line."""
        report = self.dir / "junit.xml"
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        cmd = [self.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *args]
        print("+ " + " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, cwd=ROOT, env=env, text=True)
        failed: dict[str, str] = {}
        for case in ET.parse(report).iter("testcase"):
            for kind in ("failure", "error"):
                node = case.find(kind)
                if node is not None:
                    path = case.get("classname", "").replace(".", "/") + ".py"
                    text = (node.get("message") or node.text or kind).strip().splitlines()
                    failed[f"{path}::{case.get('name')}"] = text[0][:200] if text else kind
        return failed


def install_project(env: Venv, torch_spec: str, constraints: bool) -> None:
    env.pip("install", "--quiet", torch_spec)
    extra = ["-c", str(CONSTRAINTS)] if constraints else []
    env.pip("install", "--quiet", *extra, "-e", f"{ROOT}[test]")


def cmd_lock(args: argparse.Namespace) -> int:
    torch_version = args.torch or tested_torch()
    with tempfile.TemporaryDirectory(prefix="lowvram-lock-") as tmp:
        env = Venv(Path(tmp) / "venv")
        install_project(env, f"torch=={torch_version}", constraints=False)
        check = env.pip("check", check=False)
        if check.returncode:
            print(check.stdout)
            raise SystemExit("the newest set within pyproject's bounds is inconsistent: fix the bounds first")
        pins = sorted((n, v) for n, v in env.versions().items() if not NOT_PINNED.match(n))
    header = [
        "# The dependency set CI tested: `pip install -c constraints.txt -e .` installs exactly it.",
        "# Regenerate with `python tools/deps.py lock` (newest releases within pyproject.toml's bounds), then run",
        "# the suite (`bash .ci/run`) before committing. torch is not pinned here (install your platform's build",
        "# first: docs/hardware.md); CI installs the version on the next line.",
        f"# torch: {torch_version}",
    ]
    CONSTRAINTS.write_text("\n".join(header + [f"{n}=={v}" for n, v in pins]) + "\n")
    print(f"wrote {CONSTRAINTS} ({len(pins)} packages, tested torch {torch_version})")
    return 0


def locked() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[norm(name)] = version.strip()
    return pins


def _table(rows: list[tuple[str, ...]], head: tuple[str, ...]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def cmd_newest(args: argparse.Namespace) -> int:
    """Newest releases of every direct dependency (pyproject's upper bounds ignored); who breaks what."""
    names = [req_name(r) for r in direct_requirements()]
    pins = locked()
    with tempfile.TemporaryDirectory(prefix="lowvram-newest-") as tmp:
        env = Venv(Path(tmp) / "venv")
        install_project(env, "torch", constraints=False)
        # past our own bounds on purpose: this is how a bound learns it can be lifted
        env.pip("install", "--quiet", "--upgrade", *[n for n in names if n != "torch"])
        conflicts = env.pip("check", check=False).stdout.strip()
        newest = env.versions()
        failed = env.pytest(*args.pytest)
        blame: dict[str, list[str]] = {}
        if failed:
            # one package back to its tested version at a time: the failures that go away are that package's
            for name in names:
                n = norm(name)
                if n == "torch" or n not in pins or newest.get(n) == pins[n]:
                    continue
                env.pip("install", "--quiet", f"{name}=={pins[n]}")
                still = env.pytest(*failed)
                blame[name] = sorted(set(failed) - set(still))
                env.pip("install", "--quiet", f"{name}=={newest[n]}")
    rows = []
    for name in names:
        n = norm(name)
        broke = blame.get(name, [])
        verdict = f"breaks {len(broke)}: " + ", ".join(t.split("::")[-1] for t in broke[:3]) if broke else "ok"
        rows.append((name, pins.get(n, tested_torch() if n == "torch" else "-"), newest.get(n, "?"), verdict))
    print("\n# newest releases vs the tested set\n")
    print(_table(rows, ("package", "tested", "newest", "result")))
    if conflicts and "No broken requirements" not in conflicts:
        print("\npip check (declared requirements the newest set violates):\n" + conflicts)
    unexplained = sorted(set(failed) - {t for ts in blame.values() for t in ts})
    print(f"\n{len(failed)} test(s) failed with the newest set" + (":" if failed else "."))
    for test in sorted(failed):
        print(f"  {test}\n      {failed[test]}")
    if unexplained:
        print(f"\nnot explained by any single package (a combination, or torch): {len(unexplained)}")
    return 1 if failed else 0


def cmd_oldest(args: argparse.Namespace) -> int:
    """Every direct dependency at the lower bound pyproject declares: do the floors hold?"""
    floors = []
    for req in direct_requirements():
        m = re.search(r">=\s*([0-9][^,;\s]*)", req)
        floors.append(f"{req_name(req)}=={m.group(1)}" if m else req_name(req))
    with tempfile.TemporaryDirectory(prefix="lowvram-oldest-") as tmp:
        env = Venv(Path(tmp) / "venv")
        torch_floor = next(f for f in floors if f.startswith("torch"))
        env.pip("install", "--quiet", args.torch or torch_floor)
        result = env.pip("install", "--quiet", *[f for f in floors if not f.startswith("torch")],
                         "-e", f"{ROOT}[test]", check=False)
        if result.returncode:
            print(result.stdout[-3000:])
            raise SystemExit("the lower bounds do not install together")
        print(_table(sorted(env.versions().items()), ("package", "version")))
        failed = env.pytest(*args.pytest)
    print(f"\n{len(failed)} test(s) failed at the lower bounds" + (":" if failed else "."))
    for test in sorted(failed):
        print(f"  {test}\n      {failed[test]}")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("lock", help="Write constraints.txt from the newest versions within pyproject's bounds.")
    p.add_argument("--torch", help="torch version to lock against (default: the one constraints.txt names).")
    for name, text in (("newest", "Run the fast suite on the newest releases; name the package behind each failure."),
                       ("oldest", "Run the fast suite with every direct dependency at its lower bound.")):
        p = sub.add_parser(name, help=text)
        p.add_argument("pytest", nargs="*", help="pytest arguments (default: the whole fast suite).")
        if name == "oldest":
            p.add_argument("--torch", help="torch requirement to install instead of pyproject's floor.")
    args = parser.parse_args()
    return {"lock": cmd_lock, "newest": cmd_newest, "oldest": cmd_oldest}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
