"""What the GPU suite needs on the device image, and the wheels that carry what the image lacks.

The device machine (the ``device`` tool's kinds nvidia-h100-x1 / nvidia-h200) runs an image whose
Python packages are listed in ``bench/device_image.txt``; nothing can be downloaded there. The
suite's third-party imports (``SUITE_IMPORTS``) that the image lacks travel as wheels in the
ignored folder ``.whl/``, at exactly the versions ``requirements/lock.txt`` pins (the set CI tests),
built for the image's Python (3.12) and platform (manylinux x86_64), with every dependency of theirs
the image lacks too (found from the wheels' own ``Requires-Dist``).

    python3 -m bench.device_wheels prepare [--dest .whl]   # bench/prepare_device_wheels.sh
    python3 -m bench.device_wheels image-requirements       # the rehearsal's pip requirements
    python3 -m bench.device_wheels check-image PYTHON       # PYTHON's packages are the image's only

The module itself needs only the standard library (``packaging`` inside the functions that
evaluate markers), so the suite's preflight can import ``SUITE_IMPORTS`` from it on any image.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE_LIST = ROOT / "bench" / "device_image.txt"
LOCK = ROOT / "requirements" / "lock.txt"
WHEEL_DIR = ROOT / ".whl"

# module a section imports -> the distribution that provides it (the suite's third-party imports,
# transitive ones of the project's modules included; the preflight imports each and prints its version)
SUITE_IMPORTS = {
    "torch": "torch",
    "torchvision": "torchvision",
    "numpy": "numpy",
    "timm": "timm",
    "diffusers": "diffusers",
    "transformers": "transformers",
    "huggingface_hub": "huggingface-hub",
    "safetensors": "safetensors",
    "jsonschema": "jsonschema",
    "fvcore": "fvcore",
    "h5py": "h5py",
    "cv2": "opencv-python-headless",
    "scipy": "scipy",
    "skimage": "scikit-image",
    "pandas": "pandas",
    "PIL": "pillow",
    "yaml": "pyyaml",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "pytest": "pytest",  # in the image list; the suite itself no longer imports it (tests.support needs no pytest)
}
# wheel tags the device's pip accepts (the device README's list)
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
# the resolver picks these for the image's torch (the lock's pins are its own torch's: its CUDA
# libraries, triton; torch 2.11 wants setuptools<82, the lock has 84)
RESOLVED_WITH_TORCH = re.compile(r"^(nvidia-.*|cuda-.*|triton|setuptools)$")


def norm(name: str) -> str:
    """PEP 503 normalized distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_image(path: Path = IMAGE_LIST) -> tuple[str, dict[str, str]]:
    """(python ``major.minor``, {normalized name: specifier}) of the device image: ``==X`` where the
    version was read there, a range where only that is known (inferred, said so in the file), ``""``
    where nothing is."""
    python, packages = None, {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("python "):
            python = line.split()[1]
            continue
        name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line).group(0)
        packages[norm(name)] = line[len(name) :].strip()
    if python is None:
        raise ValueError(f"{path}: no 'python X.Y' line")
    return python, packages


def image_version(spec: str) -> str | None:
    """The version an image specifier records (``==X``), else None."""
    return spec[2:] if spec.startswith("==") else None


def target_environment(python: str) -> dict[str, str]:
    """PEP 508 marker environment of the device: CPython ``python`` on Linux x86_64."""
    return {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "extra": "",
    }


def read_lock(path: Path = LOCK, python: str = "3.12") -> dict[str, str]:
    """{normalized name: pinned version} of the lock lines whose marker holds on the device."""
    from packaging.markers import Marker  # noqa: PLC0415

    env = target_environment(python)
    pins = {}
    for line in path.read_text().splitlines():
        if not re.match(r"^[A-Za-z0-9]", line):
            continue
        spec, _, marker = line.partition(";")
        if marker.strip() and not Marker(marker.strip()).evaluate(env):
            continue
        name, _, version = spec.strip().partition("==")
        pins[norm(name)] = version
    return pins


def wheel_name(path: Path) -> str:
    return norm(path.name.split("-")[0])


def requirements_of(wheel: Path, python: str) -> list:
    """The ``Requires-Dist`` of ``wheel`` that hold on the device (no extras), as
    ``packaging.requirements.Requirement``."""
    from packaging.requirements import Requirement  # noqa: PLC0415

    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    env = target_environment(python)
    out = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(env):
                out.append(req)
    return out


def fetch(name: str, version: str, python: str, into: Path) -> Path:
    """The wheel of ``name==version`` for the device in ``into``: a binary wheel for its Python and
    platform, else (sdist only, e.g. fvcore) a wheel built here, which must be pure Python."""
    spec = f"{name}=={version}"
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    pip = [sys.executable, "-m", "pip"]
    download = [*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", python]
    download += ["--implementation", "cp", *platforms, "-d", str(into), spec]
    before = set(into.iterdir())
    res = subprocess.run(download, capture_output=True, text=True)
    if res.returncode != 0:
        res = subprocess.run([*pip, "wheel", "--no-deps", "-w", str(into), spec], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"no wheel of {spec} for Python {python}:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    new = [p for p in set(into.iterdir()) - before if p.suffix == ".whl" and wheel_name(p) == norm(name)]
    if len(new) != 1:
        raise RuntimeError(f"{spec}: expected one new wheel in {into}, found {sorted(p.name for p in new)}")
    tags = new[0].name.removesuffix(".whl").split("-")[-3:]
    if tags[1] == "none" and tags[2] == "any":
        return new[0]
    if not (tags[0].startswith(f"cp{python.replace('.', '')}") or tags[1] == "abi3"):
        raise RuntimeError(f"{new[0].name} is not for CPython {python}")
    return new[0]


def prepare(dest: Path = WHEEL_DIR, image: Path = IMAGE_LIST, lock: Path = LOCK, log=print) -> list[dict]:
    """Fill ``dest`` with the wheels of the ``SUITE_IMPORTS`` distributions the image lacks and of
    their dependencies the image lacks, at the lock's versions; the list of {name, version, wheel,
    why}. A dependency the image has at a recorded version that the wheel's requirement excludes is
    an error (the carried wheel would not import there). Wheels already in ``dest`` at the wanted
    version are reused; others in it are removed."""
    python, on_image = read_image(image)
    pins = read_lock(lock, python)
    dest.mkdir(parents=True, exist_ok=True)
    roots = [norm(d) for d in dict.fromkeys(SUITE_IMPORTS.values()) if norm(d) not in on_image]
    queue = [(name, "imported by the GPU suite") for name in roots]
    plan: dict[str, dict] = {}
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        while queue:
            name, why = queue.pop(0)
            if name in plan:
                continue
            if name not in pins:
                raise RuntimeError(f"{name} ({why}) is not pinned in {lock}: add it to pyproject.toml and refresh")
            version = pins[name]
            have = [p for p in dest.glob("*.whl") if wheel_name(p) == name and p.name.split("-")[1] == version]
            wheel = have[0] if have else fetch(name, version, python, Path(tmp))
            plan[name] = {"name": name, "version": version, "wheel": wheel, "why": why}
            for req in requirements_of(wheel, python):
                dep = norm(req.name)
                if dep in on_image:
                    known = image_version(on_image[dep])
                    if known and not req.specifier.contains(known, prereleases=True):
                        problems.append(f"{name} {version} needs {req}, the image has {dep} {known}")
                elif dep not in plan:
                    queue.append((dep, f"required by {name} {version} ({req})"))
        if problems:
            raise RuntimeError("the carried wheels do not fit the image:\n  " + "\n  ".join(problems))
        keep = set()
        for item in plan.values():
            target = dest / item["wheel"].name
            if item["wheel"].parent != dest:
                shutil.move(str(item["wheel"]), target)
            item["wheel"] = target
            keep.add(target.name)
    for old in dest.glob("*.whl"):
        if old.name not in keep:
            old.unlink()
    (dest / "PYTHON").write_text(python + "\n")
    manifest = [f"{i['wheel'].name}  # {i['why']}" for i in plan.values()]
    (dest / "MANIFEST.txt").write_text("\n".join(manifest) + "\n")
    for line in manifest:
        log(line)
    return list(plan.values())


def image_requirements(image: Path = IMAGE_LIST, lock: Path = LOCK) -> list[str]:
    """pip requirements of a rehearsal environment: the locked packages the image holds, at the
    image's version or range where recorded (else the lock's version); the CUDA libraries, triton
    and setuptools are left to the resolver (they follow the image's torch, not the lock's)."""
    python, on_image = read_image(image)
    reqs = {}
    for name, version in read_lock(lock, python).items():
        if name not in on_image or RESOLVED_WITH_TORCH.match(name):
            continue
        reqs[name] = f"{name}{on_image[name] or '==' + version}"
    suite = {norm(d) for d in SUITE_IMPORTS.values()}
    for name, spec in on_image.items():  # the image's versions of the suite's imports the lock lacks
        if spec and name in suite and name not in reqs:
            reqs[name] = f"{name}{spec}"
    return sorted(reqs.values())


def check_image(python_exe: str, image: Path = IMAGE_LIST) -> list[str]:
    """Distributions installed for ``python_exe`` that the image does not list (pip's own aside)."""
    _, on_image = read_image(image)
    out = subprocess.run(
        [python_exe, "-m", "pip", "list", "--format", "json"], capture_output=True, text=True, check=True
    ).stdout
    installed = {norm(d["name"]): d["version"] for d in json.loads(out)}
    return [f"{n} {v}" for n, v in sorted(installed.items()) if n not in on_image and n not in ("pip", "setuptools")]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python3 -m bench.device_wheels", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="fill DEST with the wheels the device image lacks")
    p.add_argument("--dest", type=Path, default=WHEEL_DIR)
    sub.add_parser("image-requirements", help="print the rehearsal environment's requirements")
    c = sub.add_parser("check-image", help="fail if PYTHON has packages the image does not list")
    c.add_argument("python")
    args = ap.parse_args(argv)
    if args.command == "prepare":
        try:
            prepare(args.dest)
        except RuntimeError as err:
            raise SystemExit(f"prepare_device_wheels: {err}") from err
    elif args.command == "image-requirements":
        print("\n".join(image_requirements()))
    else:
        extra = check_image(args.python)
        if extra:
            raise SystemExit(f"{args.python} has packages the device image does not list: {', '.join(extra)}")
        print(f"{args.python}: every installed package is on the device image's list")


if __name__ == "__main__":
    main()
