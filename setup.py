"""pllava-engine: engine/ -> `pllava`, kernels/ -> `pllava.kernels`, csrc/ -> `pllava._C` (optional)."""
import glob
import logging
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

log = logging.getLogger("pllava.setup")


class OptionalBuildExt(build_ext):
    """Builds pllava._C when a compiler and pybind11 are present; never fails the install.

    The engine falls back to its torch preprocessing when the extension is missing and says so
    (`pllava.native_available()`), and quantize="int8" decodes through torch's int8 GEMV instead of the
    extension's fp32 one (the log says which).
    """

    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any compiler failure must leave a working install
            self._warn(e)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            self._warn(e)

    @staticmethod
    def _warn(e):
        sys.stderr.write(f"WARNING: pllava._C was not built ({e}); the torch preprocessing and int8 paths will be used.\n")


def _extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return []
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        sys.stderr.write("WARNING: pybind11 not installed; pllava._C is skipped.\n")
        return []
    return [Pybind11Extension("pllava._C", sources, cxx_std=17,
                              extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"])]


setup(
    name="pllava-engine",
    version="0.1.0",
    description="Triton-accelerated single-GPU low-latency inference engine for PLLaVA video-language models",
    python_requires=">=3.10",
    package_dir={"pllava": "engine", "pllava.kernels": "kernels"},
    packages=["pllava", "pllava.model", "pllava.kernels"],
    package_data={"pllava": ["static/*.html"]},
    install_requires=[
        "torch",  # never pinned: users bring their CUDA build
        "triton; platform_system == 'Linux'",
        "transformers>=4.45",
        "tokenizers",  # pllava.testing (the demo's tokenizer); transformers brings it too
        "safetensors",
        "huggingface_hub",
        "av",
        "numpy",
        "tqdm",
        "pillow",
        # serving and the benchmark are main uses: their dependencies come with the base install
        "fastapi",
        "starlette",
        "uvicorn",
        "python-multipart",
        "matplotlib",
    ],
    extras_require={
        "serve": [],  # kept so `pip install pllava-engine[serve]` from older instructions still works
        "bench": [],
        "ray": ["ray[data]"],
        "dev": ["pytest", "pytest-benchmark", "transformers>=4.45", "tokenizers", "pybind11", "matplotlib", "fastapi",
                "uvicorn", "python-multipart", "httpx", "openai", "selenium", "ray[data]"],
        "gpu": ["flash-attn; platform_system == 'Linux'", "xformers; platform_system == 'Linux'"],
    },
    ext_modules=_extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
    entry_points={"console_scripts": ["pllava=pllava.cli:main"]},
)
