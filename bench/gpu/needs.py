"""The Python packages the GPU machine lacks, carried to it as wheels in .whl/ (git-ignored).

    python -m bench.gpu.needs pins                       NAME==VERSION of each carried package, from the lock
    python -m bench.gpu.needs slim .whl                  drop bitsandbytes' libraries for other CUDA versions
    python -m bench.gpu.needs select [.whl] --report F   the wheels to install here, one path a line

The GPU machine (its image: /work/.library/device/KINDS.md; no registry reachable) has Python 3.12 with torch,
transformers 5.17, accelerate, tokenizers, safetensors and more, but not pydantic, trl, datasets or
bitsandbytes, and a transformers older than tunekit's >= 5.20. bench/gpu/wheels.sh downloads CARRIED at the
versions of requirements/lock.txt; bench/gpu/run.sh installs, from those, only the packages that are missing
there or at a version something needs otherwise (tunekit with its qlora and bench extras, or a carried
package's own requirements), and torch is always the machine's own. `select` also reports the requirements
that no carried wheel meets (written to --report), so a part that will fail for a missing package says why.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "lock.txt"
# Missing there (pydantic for tunekit's config; trl, datasets for the comparison; bitsandbytes for qlora),
# too old there (transformers), of unknown version there (peft), or small and needed at a newer version than
# the image may have (typing_extensions for pydantic, fsspec for datasets, regex for transformers).
CARRIED = ("pydantic", "pydantic_core", "annotated-types", "typing-inspection", "typing_extensions", "transformers",
           "peft", "trl", "datasets", "dill", "multiprocess", "fsspec", "regex", "bitsandbytes")
EXTRAS = ("qlora", "bench")
# The Python packages of the GPU machine's image ('cuda'), as /work/.library/device/KINDS.md lists them (read
# there on 2026-11-17). tests/test_gpu_script.py checks that every package the CPU smoke run imports is here or
# carried.
DEVICE_IMAGE = frozenset(canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp""".split())
# bitsandbytes ships one library per CUDA / ROCm / XPU version (129 MB unpacked); the device's torch is
# 2.11+cu130, so its CUDA 13 libraries and the CPU one are what it can load.
BNB_KEEP = re.compile(r"libbitsandbytes_(cuda13\d*|cpu)\.\w+$")


def lock_versions(path: Path = LOCK) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, _, version = line.strip().partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def pins(path: Path = LOCK) -> list[str]:
    versions = lock_versions(path)
    missing = [n for n in CARRIED if canonicalize_name(n) not in versions]
    if missing:
        raise SystemExit(f"{path} pins no version of {', '.join(missing)}")
    return [f"{n}=={versions[canonicalize_name(n)]}" for n in CARRIED]


def tunekit_requirements() -> list[Requirement]:
    """tunekit's dependencies and its qlora and bench extras, from pyproject.toml."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + [r for e in EXTRAS for r in project["optional-dependencies"][e]]
    return [Requirement(line) for line in lines]


def wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return canonicalize_name(name), version


def wheel_requirements(path: Path) -> list[Requirement]:
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    return [Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines() if line.startswith("Requires-Dist:")]


def applies(req: Requirement) -> bool:
    """Not an extra's requirement, and its environment marker holds here."""
    return req.marker is None or req.marker.evaluate({"extra": ""})


def select(carried: dict[str, str], installed: dict[str, str | None],
           requirements: list[Requirement]) -> tuple[list[str], list[str]]:
    """(carried packages to install, requirements nothing meets). A carried package is installed when it is
    missing here or its installed version fails a requirement; the rest is checked against what will be
    there (the carried version where one is installed, else the installed one)."""
    reqs = [r for r in requirements if applies(r)]

    def meets(req: Requirement, version: str | None) -> bool:
        return version is not None and req.specifier.contains(Version(version), prereleases=True)

    install = [name for name in carried
               if not all(meets(r, installed.get(name)) for r in reqs if canonicalize_name(r.name) == name)]
    effective = {**installed, **{name: carried[name] for name in install}}
    unmet = sorted({f"{r} (here: {effective.get(canonicalize_name(r.name)) or 'missing'})" for r in reqs
                    if not meets(r, effective.get(canonicalize_name(r.name)))})
    return install, unmet


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def select_here(wheel_dir: Path | None) -> dict:
    """`select` on this machine: the wheels in `wheel_dir` (or, without one, the lock's versions of CARRIED)."""
    wheels = {wheel_name_version(p)[0]: p for p in sorted(wheel_dir.glob("*.whl"))} if wheel_dir else {}
    locked = lock_versions()
    carried = {canonicalize_name(n): (wheel_name_version(wheels[canonicalize_name(n)])[1]
                                      if canonicalize_name(n) in wheels else locked[canonicalize_name(n)])
               for n in CARRIED}
    reqs = tunekit_requirements()
    for name in carried:  # each carried package's own needs, from its wheel (else its installed metadata)
        if name in wheels:
            reqs += wheel_requirements(wheels[name])
        elif installed_version(name) is not None:
            reqs += [Requirement(r) for r in metadata.requires(name) or []]
    names = {canonicalize_name(r.name) for r in reqs} | set(carried)
    installed = {name: installed_version(name) for name in names}
    install, unmet = select(carried, installed, reqs)
    absent = [n for n in install if n not in wheels]
    return {"python": sys.version.split()[0], "installed": installed, "carried": carried,
            "install": [str(wheels[n]) for n in install if n in wheels], "install_names": install,
            "needed_but_not_carried": absent, "unmet": unmet}


def slim(wheel_dir: Path) -> None:
    """Rewrite the bitsandbytes wheel without the libraries of other CUDA / ROCm / XPU versions (its RECORD
    too, so pip installs it as any wheel)."""
    for path in wheel_dir.glob("bitsandbytes-*.whl"):
        tmp = path.with_suffix(".tmp")
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            dropped = {n for n in src.namelist() if "/libbitsandbytes_" in n and not BNB_KEEP.search(n)}
            for info in src.infolist():
                if info.filename in dropped:
                    continue
                data = src.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    data = "".join(line for line in data.decode().splitlines(keepends=True)
                                   if line.split(",", 1)[0] not in dropped).encode()
                dst.writestr(info, data)
        tmp.replace(path)
        print(f"{path.name}: {len(dropped)} libraries for other platforms dropped, {path.stat().st_size / 2**20:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("pins")
    s = sub.add_parser("slim")
    s.add_argument("wheels", type=Path)
    s = sub.add_parser("select")
    s.add_argument("wheels", type=Path, nargs="?")
    s.add_argument("--report", type=Path)
    args = parser.parse_args()
    if args.command == "pins":
        print("\n".join(pins()))
    elif args.command == "slim":
        slim(args.wheels)
    else:
        report = select_here(args.wheels if args.wheels and args.wheels.is_dir() else None)
        if args.report:
            args.report.write_text(json.dumps(report, indent=1))
        for line in report["unmet"]:
            print(f"needs: unmet here: {line}", file=sys.stderr)
        if report["install"]:
            print("\n".join(report["install"]))


if __name__ == "__main__":
    main()
