"""Pre-flight check of the installation: ``python -m pipeline doctor``.

Each check returns (name, ok, detail, fix). Hard problems make the command exit 1.
"""

from __future__ import annotations

import importlib
import platform
import sys
from dataclasses import dataclass


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    hard: bool = True


def _python() -> Check:
    ok = sys.version_info >= (3, 11)
    return Check("python", ok, platform.python_version(), "install Python >= 3.11")


def _torch() -> list[Check]:
    out = []
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        return [Check("torch", False, f"import failed: {exc}", "make install (pip install -e .)")]
    out.append(Check("torch", True, torch.__version__))
    try:
        import torchvision
        from torchvision.ops import nms

        boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
        nms(boxes, torch.tensor([1.0]), 0.5)  # fails when torch/torchvision builds do not match
        out.append(Check("torchvision", True, f"{torchvision.__version__} (operators load: matches torch)"))
    except Exception as exc:  # noqa: BLE001
        out.append(
            Check(
                "torchvision",
                False,
                f"{type(exc).__name__}: {str(exc).splitlines()[0]}",
                "torch and torchvision builds do not match: pip install --force-reinstall torch torchvision "
                "(the registry's matching pair; do not pin a CPU-only torch beside a CUDA torchvision)",
            )
        )
    cuda = torch.cuda.is_available()
    if cuda:
        name = torch.cuda.get_device_name(0)
        bf16 = torch.cuda.is_bf16_supported()
        out.append(Check("gpu", True, f"CUDA {torch.version.cuda}: {name}; bf16 {'yes' if bf16 else 'no'}", hard=False))
    else:
        out.append(Check("gpu", True, "none (CPU inference)", hard=False))
    from pipeline.core.runtime import cpu_bf16_supported, cpu_description

    out.append(Check("cpu", True, f"{cpu_description()}; torch threads {torch.get_num_threads()}", hard=False))
    bf16 = cpu_bf16_supported()
    out.append(
        Check(
            "cpu bf16",
            True,
            "supported (AVX-512 BF16 / AMX): bf16 autocast is the default CPU backend"
            if bf16
            else "not supported: fp32 on CPU",
            hard=False,
        )
    )
    return out


def _openslide() -> Check:
    try:
        import openslide

        return Check(
            "openslide", True, f"openslide-python {openslide.__version__}, library {openslide.__library_version__}"
        )
    except Exception as exc:  # noqa: BLE001
        return Check("openslide", False, f"{type(exc).__name__}: {exc}", "pip install openslide-python openslide-bin")


def _module(name: str, fix: str, hard: bool = True) -> Check:
    try:
        mod = importlib.import_module(name)
        return Check(name, True, getattr(mod, "__version__", "ok"), hard=hard)
    except Exception as exc:  # noqa: BLE001
        return Check(name, False, f"{type(exc).__name__}: {exc}", fix, hard=hard)


def _albumentations() -> Check:
    import os

    import pipeline  # noqa: F401 - sets NO_ALBUMENTATIONS_UPDATE

    c = _module("albumentations", "pip install albumentations")
    if c.ok and os.environ.get("NO_ALBUMENTATIONS_UPDATE") != "1":
        return Check("albumentations", False, "update check not disabled", "set NO_ALBUMENTATIONS_UPDATE=1")
    return c


def _compiler() -> Check:
    """Soft check: what ``--backend torch-bf16-compile`` needs on the CPU (a C++ compiler for TorchInductor)."""
    from pipeline.patch.backends.torch_runner import cxx_compiler

    found = cxx_compiler()
    if found:
        return Check("c++ compiler", True, f"{found} (for --backend torch-bf16-compile)", hard=False)
    return Check(
        "c++ compiler",
        False,
        "none on PATH: --backend torch-bf16-compile cannot run (the other backends can)",
        "install g++ (e.g. apt-get install g++) or set $CXX",
        hard=False,
    )


def _demo_model() -> Check:
    from pipeline.core.paths import DEMO_BUNDLE

    if (DEMO_BUNDLE / "bundle.json").is_file():
        return Check(
            "demo model", True, f"{DEMO_BUNDLE} (trained on synthetic slides only, not for clinical use)", hard=False
        )
    return Check(
        "demo model", False, f"{DEMO_BUNDLE} missing", "python train.py --config configs/demo.yaml", hard=False
    )


def run_checks() -> list[Check]:
    checks = [_python(), *_torch(), _openslide(), _albumentations()]
    for name, fix in [
        ("sklearn", "pip install scikit-learn"),
        ("tifffile", "pip install tifffile imagecodecs"),
        ("imagecodecs", "pip install imagecodecs"),
        ("cv2", "pip install opencv-python-headless"),
        ("h5py", "pip install h5py"),
        ("safetensors", "pip install safetensors"),
        ("pydantic", "pip install 'pydantic>=2'"),
    ]:
        checks.append(_module(name, fix))
    checks.append(
        _module("onnxruntime", "pip install -e '.[onnx]' (needed only for --backend onnx-fp32 / onnx-int8)", hard=False)
    )
    checks.append(_compiler())
    checks.append(_demo_model())
    return checks


def main(argv: list[str] | None = None) -> int:
    checks = run_checks()
    width = max(len(c.name) for c in checks)
    for c in checks:
        mark = "ok  " if c.ok else ("FAIL" if c.hard else "warn")
        line = f"[{mark}] {c.name:<{width}}  {c.detail}"
        if not c.ok and c.fix:
            line += f"\n       fix: {c.fix}"
        print(line)
    hard = [c for c in checks if not c.ok and c.hard]
    print(f"\n{len(hard)} hard problem(s)" if hard else "\nall good")
    return 1 if hard else 0
